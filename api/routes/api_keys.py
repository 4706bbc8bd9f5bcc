"""API-key lifecycle events from the key-management backend (role `service`)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/api-keys", tags=["api keys"])
