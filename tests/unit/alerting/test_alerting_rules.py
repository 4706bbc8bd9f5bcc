"""RuleBook: defaults, overrides, versions, tombstones, service filters, snapshots."""

from __future__ import annotations

import pickle

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.alerting import (
    GLOBAL_USER,
    InvalidRuleMessage,
    RuleBook,
    decode_rule_message,
    default_rule_id,
    instance_id,
)
from schemas.alerts import AlertRule, Metric, Op


def user_rule(rule_id: str = "mine", user_id: str = "alice", **kw: object) -> AlertRule:
    fields: dict[str, object] = {
        "rule_id": rule_id, "user_id": user_id, "name": "mine", "metric": Metric.ERROR_RATE,
        "op": Op.GT, "threshold": 0.2,
    }
    fields.update(kw)
    return AlertRule(**fields)  # type: ignore[arg-type]


def ids(rules: tuple[AlertRule, ...]) -> list[str]:
    return [r.rule_id for r in rules]


def test_every_user_gets_the_defaults() -> None:
    book = RuleBook()
    rules = book.rules_for("alice", "openai")
    assert ids(rules) == [
        "default:alice:error_rate", "default:alice:latency_p95_ms",
        "default:alice:requests_anomaly",
    ]
    by_metric = {r.metric: r for r in rules}
    assert by_metric[Metric.ERROR_RATE].threshold == 0.05
    assert by_metric[Metric.ERROR_RATE].for_windows == 2
    assert by_metric[Metric.LATENCY_P95_MS].threshold == 2000
    assert by_metric[Metric.LATENCY_P95_MS].for_windows == 2
    assert all(r.user_id == "alice" for r in rules)
    assert book.rules_for("alice", "openai") is rules  # cached: O(1) per window


def test_override_by_rule_id_edits_and_tombstone_restores() -> None:
    book = RuleBook()
    rid = default_rule_id("alice", "error_rate")
    assert book.upsert(user_rule(rid, threshold=0.1, version=1))
    rules = book.rules_for("alice", "openai")
    assert [r.threshold for r in rules if r.metric == Metric.ERROR_RATE] == [0.1]
    assert book.upsert(user_rule(rid, enabled=False, version=2))
    assert Metric.ERROR_RATE not in {r.metric for r in book.rules_for("alice", "openai")}
    assert book.apply(decode_rule_message(rid.encode(), None))
    assert default_rule_id("alice", "error_rate") in ids(book.rules_for("alice", "openai"))
    # bob is never affected
    assert len(book.rules_for("bob", "openai")) == 3


def test_own_unfiltered_rule_on_same_metric_replaces_default() -> None:
    book = RuleBook()
    book.upsert(user_rule("my-errors"))
    rules = ids(book.rules_for("alice", "openai"))
    assert "my-errors" in rules
    assert default_rule_id("alice", "error_rate") not in rules
    # a service-filtered rule does not remove the default elsewhere
    book.upsert(user_rule("my-latency", metric=Metric.LATENCY_P95_MS, service="stripe"))
    assert default_rule_id("alice", "latency_p95_ms") in ids(book.rules_for("alice", "openai"))
    stripe = ids(book.rules_for("alice", "stripe"))
    assert "my-latency" in stripe and default_rule_id("alice", "latency_p95_ms") in stripe
    assert "my-latency" not in ids(book.rules_for("alice", "openai"))


def test_older_version_never_overwrites_newer() -> None:
    book = RuleBook()
    assert book.upsert(user_rule(threshold=0.3, version=5))
    assert not book.upsert(user_rule(threshold=0.1, version=4))
    assert book.get("mine").threshold == 0.3  # type: ignore[union-attr]
    assert book.upsert(user_rule(threshold=0.3, version=5))  # idempotent replay
    assert book.delete("mine")
    assert not book.upsert(user_rule(version=5))  # stale copy cannot resurrect
    assert book.upsert(user_rule(version=6))


def test_global_templates_can_be_changed_by_admin() -> None:
    book = RuleBook()
    template = book.get(default_rule_id(GLOBAL_USER, "error_rate"))
    assert template is not None
    changed = msgspec.structs.replace(template, threshold=0.1, version=1)
    assert book.upsert(changed)
    (err,) = [r for r in book.rules_for("carol", "x") if r.metric == Metric.ERROR_RATE]
    assert (err.rule_id, err.threshold) == ("default:carol:error_rate", 0.1)
    extra = user_rule("policy:*:cost", user_id=GLOBAL_USER, metric=Metric.COST_USD,
                      threshold=100.0)
    book.upsert(extra)
    assert "policy:carol:cost" in ids(book.rules_for("carol", "x"))
    assert instance_id("plain", "carol") == "plain:carol"


def test_owner_moves_and_tombstone_routing() -> None:
    book = RuleBook()
    book.upsert(user_rule("r", user_id="alice"))
    assert book.owner_of("r") == "alice"
    book.upsert(user_rule("r", user_id="bob", version=1))
    assert "r" not in ids(book.rules_for("alice", "s"))
    assert "r" in ids(book.rules_for("bob", "s"))
    assert not book.delete("unknown")


def test_decode_rule_message_errors() -> None:
    rule = user_rule()
    assert decode_rule_message(b"mine", msgspec.json.encode(rule)).rule == rule
    with pytest.raises(InvalidRuleMessage):
        decode_rule_message(b"mine", b"{not json")
    with pytest.raises(InvalidRuleMessage):
        decode_rule_message(b"other", msgspec.json.encode(rule))
    with pytest.raises(InvalidRuleMessage):
        decode_rule_message(None, None)
    with pytest.raises(InvalidRuleMessage):
        decode_rule_message(b"mine", b'{"rule_id":"mine","user_id":"a","name":"n",'
                                     b'"metric":"nope","threshold":1}')


rule_ops = st.lists(
    st.tuples(
        st.sampled_from(["r1", "r2", "default:alice:error_rate"]),
        st.one_of(st.none(), st.builds(
            user_rule, threshold=st.floats(0, 1), enabled=st.booleans(),
            service=st.sampled_from([None, "openai", "stripe"]),
            metric=st.sampled_from([Metric.ERROR_RATE, Metric.REQUESTS]),
            version=st.integers(0, 5),
        )),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(rule_ops)
def test_cached_lookups_match_a_rebuilt_book(ops: list[tuple[str, AlertRule | None]]) -> None:
    book = RuleBook()
    for service in ("openai", "stripe"):
        book.rules_for("alice", service)  # warm the cache, then mutate
    for rid, rule in ops:
        if rule is None:
            book.delete(rid)
        else:
            book.upsert(msgspec.structs.replace(rule, rule_id=rid))
        restored: RuleBook = pickle.loads(pickle.dumps(book))
        for service in ("openai", "stripe"):
            got = book.rules_for("alice", service)
            assert restored.rules_for("alice", service) == got
            assert all(r.enabled and r.service in (None, service) for r in got)
            assert len({r.rule_id for r in got}) == len(got)
