"""System stats: the process, the machine, and every registered part's counters."""

from __future__ import annotations

import time
from typing import Any

import psutil
from fastapi import APIRouter

from core import metrics

router = APIRouter(prefix="/api/system", tags=["system"])
_process = psutil.Process()
_started = time.time()


@router.get("/stats")
def system_stats() -> dict[str, Any]:
    memory = psutil.virtual_memory()
    return {
        "cpu_percent": psutil.cpu_percent(interval=None),
        "memory": {"total": memory.total, "available": memory.available,
                   "percent": memory.percent},
        "process": {"rss": _process.memory_info().rss, "threads": _process.num_threads(),
                    "uptime_seconds": round(time.time() - _started, 1)},
        "parts": metrics.collect(),
    }
