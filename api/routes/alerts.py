"""Alert history (DESIGN §3, §8): firing first, then newest."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/alerts", tags=["alerts"])
