"""`keypulse`: one console script (DESIGN §6).

Each subcommand lives in `keypulse/commands/<name>.py` with `add_arguments(parser)` and
`run(args, settings) -> int`. Deliberate errors (KeypulseError) print as one line and exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from core import __version__
from core.errors import KeypulseError

COMMANDS: dict[str, str] = {
    "kafka": "local single-node Apache Kafka (KRaft): start, stop, status",
    "migrate": "create or upgrade the ClickHouse schema at the DSN",
    "run": "the embedded default: pipeline, HTTP API and WebSocket bridge in one process",
    "pipeline": "the Bytewax dataflow alone (several processes form one cluster)",
    "api": "the HTTP API alone",
    "ws": "the WebSocket bridge alone",
    "gen": "emit realistic usage events to Kafka (SDK stand-in and load generator)",
    "token": "mint a JWT with the configured secret",
    "sql": "read-only SQL on the store (through the running API, else directly)",
    "dlq": "dead letters: inspect usage.events.dlq, replay records to usage.events once",
}
# The commands that serve (or load) the HTTP API, whose usage exports need pyarrow.
ARROW_COMMANDS = frozenset({"run", "api", "sql"})


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in `argv` is imported (all of them when None).

    A command's module imports what it needs (Bytewax, the web stack, ClickHouse...), so
    loading one command's options keeps the others' imports off its cold start.
    """
    parser = argparse.ArgumentParser(
        prog="keypulse", description="Real-time usage analytics for managed API keys."
    )
    parser.add_argument("--version", action="version", version=f"keypulse {__version__}")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    named = None if argv is None else next((a for a in argv if a in COMMANDS), "")
    for name, help_text in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text)
        if named is None or name == named:
            module = importlib.import_module(f"keypulse.commands.{name}")
            module.add_arguments(command)
            command.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # chDB imports pyarrow for its Arrow APIs, which only the HTTP API's exports use (CSV and
    # Parquet written by Arrow); every other process is spared the import's 0.1 s of start-up
    # and 70 MB.
    if next((a for a in argv if a in COMMANDS), "") not in ARROW_COMMANDS:
        sys.modules.setdefault("pyarrow", None)  # type: ignore[arg-type]  # blocks the import
    args = build_parser(argv).parse_args(argv)
    try:
        from core.settings import get_settings

        settings = get_settings()
        logging.basicConfig(
            level=args.log_level or settings.log_level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        for noisy in ("urllib3", "clickhouse_connect"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        return int(args._module.run(args, settings))
    except KeypulseError as exc:
        print(f"keypulse {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
