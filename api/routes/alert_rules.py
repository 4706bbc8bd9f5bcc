"""Alert rules (DESIGN §3, §8): list, create, read, update, delete; published on `alert.rules`."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/alert-rules", tags=["alert rules"])
