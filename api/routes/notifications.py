"""A user's notifications with read state shared with the WebSocket (DESIGN §8)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/notifications", tags=["notifications"])
