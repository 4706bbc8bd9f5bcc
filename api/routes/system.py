"""System stats: the process, the machine, and every registered part's counters."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import psutil
from fastapi import APIRouter

from api.responses import MsgspecResponse, described
from core import metrics

router = APIRouter(prefix="/api/system", tags=["system"])
_process = psutil.Process()
_started = time.time()


class Memory(msgspec.Struct, frozen=True):
    total: int  # bytes
    available: int  # bytes
    percent: float


class ProcessStats(msgspec.Struct, frozen=True):
    rss: int  # bytes
    threads: int
    uptime_seconds: float


class SystemStats(msgspec.Struct, frozen=True):
    cpu_percent: float  # the machine's, since the previous call
    memory: Memory
    process: ProcessStats
    parts: dict[str, dict[str, Any]]  # core.metrics, by part: counters, some per partition


@router.get("/stats", summary="process, machine and counters",
            responses=described(SystemStats, description="the stats now"))
def system_stats() -> MsgspecResponse:
    """The machine's CPU and memory, this process's, and every registered part's counters
    (core.metrics), unauthenticated like `/metrics`."""
    memory = psutil.virtual_memory()
    return MsgspecResponse(SystemStats(
        cpu_percent=psutil.cpu_percent(interval=None),
        memory=Memory(memory.total, memory.available, memory.percent),
        process=ProcessStats(_process.memory_info().rss, _process.num_threads(),
                             round(time.time() - _started, 1)),
        parts=metrics.collect(),
    ))
