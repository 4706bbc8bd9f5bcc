"""`keypulse pipeline`."""

from __future__ import annotations

import argparse

from keypulse.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace, settings: Settings) -> int:
    msg = "not implemented yet"
    raise NotImplementedError(msg)
