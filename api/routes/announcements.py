"""Announcements (admin): a `system_notification` to everyone, kept in everyone's history."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/admin/announcements", tags=["admin"])
