"""Per-(user, service) state is bounded: 200,000 distinct keys come and go, state follows.

Through the partition processor with the alerting hook, in memory (no Kafka): every key
sends one window of traffic, then the keys fall silent while one heartbeat user moves event
time on by more than `state_idle_seconds`. Open windows, anomaly baselines, traffic
history, rule-cache entries and the snapshot must come back to (near) where they started.
"""

from __future__ import annotations

import gc
import time

import psutil
import pytest

from pipeline.alerting.hook import AlertingHook
from pipeline.alerting.incidents import IncidentConfig, PopulationChange
from pipeline.items import SourceBatch
from pipeline.metrics import PipelineMetrics
from pipeline.processor import PartitionProcessor, ProcessorConfig

KEYS = 200_000
BATCH = 20_000
IDLE_S = 3600
TICK_MS = 30_000
IDLE_TICK_MS = 300_000
# Every key trusted after one clean window: the traffic history and the population changes
# (+1 on trust, -1 on pruning) are exercised for each of them.
TRUST_AT_ONCE = IncidentConfig(history_windows=1, history_min_requests=1)


def event(user: str, service: str, ts: int) -> bytes:
    return (
        f'{{"event_id":"{user}-{ts}","ts":{ts},"user_id":"{user}","api_key_id":"k",'
        f'"service":"{service}","status_code":200,"latency_ms":12.5}}'
    ).encode()


def rss_mb() -> float:
    gc.collect()
    return float(psutil.Process().memory_info().rss) / 2**20


def state(processor: PartitionProcessor) -> dict[str, int]:
    hook = processor.hook
    assert isinstance(hook, AlertingHook)
    return {
        "open_windows": sum(len(accs) for accs in processor.windows.values()),
        **hook.state_sizes(),
        "snapshot_bytes": len(processor.snapshot()),
    }


def test_state_of_200k_idle_keys_returns_to_baseline(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    started = time.monotonic()
    # Event time three hours ago (well inside the raw events' retention, never ahead of
    # wall time), the batches' wall clock injected alongside.
    base = (int(time.time() * 1000) // 60_000) * 60_000 - 3 * 3600_000
    hook_factory = AlertingHook.factory(state_idle_seconds=IDLE_S, incidents=TRUST_AT_ONCE)
    config = ProcessorConfig(window_seconds=10, allowed_lateness_seconds=5,
                             dedup_horizon_seconds=IDLE_S)
    processor = PartitionProcessor(config, None, hook_factory, metrics=PipelineMetrics())
    offset = closed = 0
    population: list[int] = []  # +1 / -1 per PopulationChange

    def feed(records: list[bytes], wall_ms: int) -> None:
        nonlocal offset, closed
        batch = SourceBatch(0, [(offset + i, None, r) for i, r in enumerate(records)],
                            wall_ms, False)
        offset += len(records)
        outs, _retain = processor.on_batch([batch])
        for out in outs:  # keep counts only: the outputs would weigh on the RSS figures
            closed += len(out.stats)
            population.extend(s.delta for s in out.signals if isinstance(s, PopulationChange))

    feed([event("heartbeat", "openai", base)], base)
    before, rss_before = state(processor), rss_mb()

    for first in range(0, KEYS, BATCH):  # 200,000 users, one service each (no service cap)
        feed([event(f"user-{i}", "openai", base + 1000 + i % 5000)
              for i in range(first, first + BATCH)], base + 6000)
    fed = state(processor)  # every key's window open
    # the heartbeat moves event time on: the keys' window closes, then they stay silent
    now = base
    for _ in range(3):
        now += TICK_MS
        feed([event("heartbeat", "openai", now)], now)
    peak, rss_peak = state(processor), rss_mb()
    while now < base + (IDLE_S + 600) * 1000:
        now += IDLE_TICK_MS
        feed([event("heartbeat", "openai", now)], now)
    feed([], now)
    after, rss_after = state(processor), rss_mb()

    with capsys.disabled():
        print(f"\n200,000 (user, service) keys ({time.monotonic() - started:.1f} s):")
        for name, values in (("baseline", before), ("fed", fed), ("evaluated", peak),
                             ("after idle", after)):
            print(f"  {name:>10}: {values}")
        print(f"  RSS MB: baseline {rss_before:.0f}, peak {rss_peak:.0f}, "
              f"after idle {rss_after:.0f}")

    assert fed["open_windows"] >= KEYS
    assert closed >= KEYS  # every key's window closed
    assert peak["baselines"] >= KEYS
    assert peak["history"] >= KEYS
    assert peak["snapshot_bytes"] > before["snapshot_bytes"] + KEYS * 20
    # back to the heartbeat's own state: one key, one open window at most
    assert after["open_windows"] <= 1
    assert after["baselines"] <= 1
    assert after["history"] <= 1
    assert after["rule_states"] == 0
    assert after["cached_rules"] <= 1
    # what is left over: the heartbeat's event ids, kept for the dedup horizon
    assert after["snapshot_bytes"] < before["snapshot_bytes"] + 8192
    assert population.count(1) >= KEYS  # each key trusted once ...
    assert sum(population) <= 1  # ... and each left its service's population again
