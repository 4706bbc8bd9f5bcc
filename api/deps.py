"""Dependency aliases for route functions."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from core.settings import Settings


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_settings)]
