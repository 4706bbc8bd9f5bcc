"""Writes `<name>/`: a processor snapshot taken by the code of an earlier release, and what
that release emitted after it (test_state.py resumes it with today's code).

    git archive <release commit> | tar -x -C /tmp/release
    .venv/bin/python tests/unit/pipeline/data/make_release_snapshot.py /tmp/release <name>

It imports `pipeline` from the tree given, so the snapshot is that release's own bytes.
`release-snapshot` is 100bb1d's (the last release without state versions: dedup ids in a log
file); `first-release-snapshot` is 1f8c0e9's (dedup ids pickled in the snapshot, window
accumulators with counts).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

T = 1_700_000_000_000  # a window boundary
WALL = T + 120_000  # the source's clock: events are a minute or two old, well admitted
HERE = Path(__file__).resolve().parent


def event(eid: str, ts: int, user: str, service: str, status: int, latency: float,
          tokens: int | None = None) -> str:
    raw: dict[str, Any] = {"event_id": eid, "ts": ts, "user_id": user, "api_key_id": "k",
                           "service": service, "status_code": status, "latency_ms": latency}
    if tokens is not None:
        raw |= {"tokens_in": tokens, "tokens_out": 2 * tokens, "cost_usd": tokens / 1000}
    return json.dumps(raw)


def key_of(raw: str) -> bytes:
    """The Kafka key: the user_id (the bad record's too, as its producer would send it)."""
    return str(json.loads(raw)["user_id"]).encode() if raw.startswith("{") else b"u0"


def stream() -> tuple[list[str], list[str]]:
    """Before the snapshot: three users, two services, duplicates, disorder and one late event;
    windows [T, T+10 s) closed, [T+10 s, T+20 s) and later still open. After it: more of the
    open windows, duplicates of ids from before the snapshot, a late event, a bad record,
    and a far event that closes everything."""
    statuses = (200, 201, 302, 404, 429, 500, 503)
    before = [event(f"a{i}", T + i * 400, f"u{i % 3}", ("openai", "stripe")[i % 2],
                    statuses[i % 7], 5.0 + i, i if i % 2 == 0 else None) for i in range(50)]
    before.insert(10, before[3])  # a duplicate
    before.append(event("late-0", T + 1000, "u0", "openai", 200, 1.0))  # window closed
    after = [event(f"b{i}", T + 15_000 + i * 300, f"u{i % 3}", ("openai", "stripe")[i % 2],
                   statuses[(i + 3) % 7], 100.0 - i, 7) for i in range(40)]
    after.insert(5, before[40])  # a duplicate of an id from before the snapshot
    after.insert(20, event("late-1", T + 9000, "u1", "stripe", 500, 3.0))
    after.append("not json")
    after.append(event("far", T + 400_000, "u2", "openai", 200, 1.0))  # within the skew bound
    return before, after


def main(release: Path, target: Path) -> None:
    sys.path.insert(0, str(release))
    from pipeline.items import SourceBatch
    from pipeline.processor import PartitionProcessor, ProcessorConfig

    assert Path(sys.modules["pipeline"].__file__ or "").is_relative_to(release)

    before, after = stream()
    with tempfile.TemporaryDirectory() as tmp:
        logs = {"dedup_dir": Path(tmp)} if "dedup_dir" in ProcessorConfig.__annotations__ else {}
        config = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5, **logs)
        processor = PartitionProcessor(config, None, run_id="release")
        records = [(i, key_of(raw), raw.encode()) for i, raw in enumerate(before)]
        processor.on_batch([SourceBatch(0, records, WALL, False)])
        snapshot = processor.snapshot()
        records = [(len(before) + i, key_of(raw), raw.encode()) for i, raw in enumerate(after)]
        (out,), _ = processor.on_batch([SourceBatch(0, records, WALL + 1000, False)])
        if target.exists():
            shutil.rmtree(target)
        target.mkdir()
        (target / "snapshot.pickle").write_bytes(snapshot)
        for ids in Path(tmp).glob("*.ids"):
            shutil.copy(ids, target / ids.name)
    import msgspec

    expected = {
        "before": before,
        "after": after,
        "wall_ms": WALL + 1000,
        "stats": [msgspec.to_builtins(s) for s in out.stats],
        "dead_letters": [[d.offset, d.reason] for d in out.dead_letters],
        # Rows in today's encoding (the first releases encoded them otherwise: not compared).
        "rows": (b"".join(chunk.data for chunk in out.event_rows).decode()
                 if all(hasattr(chunk, "data") for chunk in out.event_rows) else None),
    }
    (target / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), HERE / sys.argv[2])
