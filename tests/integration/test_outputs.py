"""Each declared output (core/outputs.py) against the real tables after `migrate`: every field
of the model has its column, every declared column exists, and the engine fills the rest."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from core import topics
from core.outputs import JSON_EACH_ROW, OUTPUTS, Output, insert
from core.settings import Settings
from infra.clickhouse.migrate import migrate
from tests.integration.harness import embedded

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tables(settings: Settings, tmp_path_factory: pytest.TempPathFactory
           ) -> dict[str, list[tuple[str, str]]]:
    """table → [(column, default_kind)] in position order, from system.columns."""
    with embedded(tmp_path_factory.mktemp("outputs") / "ch") as client:
        migrate(client, settings, progress=lambda _line: None)
        rows = client.query(
            "SELECT table, name, default_kind FROM system.columns WHERE database = {db:String} "
            "ORDER BY table, position", parameters={"db": settings.clickhouse_database},
        ).result_rows
    found: dict[str, list[tuple[str, str]]] = {}
    for table, name, default_kind in rows:
        found.setdefault(str(table), []).append((str(name), str(default_kind)))
    return found


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: o.name)
def test_every_model_field_has_its_column(
    output: Output, tables: dict[str, list[tuple[str, str]]]
) -> None:
    columns = [name for name, _ in tables[output.table]]
    missing = [f for f in output.model_fields() if f not in columns]
    assert missing == [], f"{output.model.__name__} fields without a column in {output.table}"
    undeclared = [f for f in output.model_fields() if f not in output.columns]
    assert undeclared == [], f"{output.name}: model fields the sink does not write"
    assert [c for c in output.columns if c not in columns] == []


@pytest.mark.parametrize("output", OUTPUTS, ids=lambda o: o.name)
def test_columns_the_sink_does_not_write_are_filled_by_the_engine(
    output: Output, tables: dict[str, list[tuple[str, str]]]
) -> None:
    unwritten = [(name, kind) for name, kind in tables[output.table]
                 if name not in output.columns]
    assert all(kind in ("DEFAULT", "MATERIALIZED") for _, kind in unwritten), unwritten


def test_positional_outputs_match_the_table_order(
    tables: dict[str, list[tuple[str, str]]]
) -> None:
    """usage_events_rows takes rows without a column list anywhere they are written."""
    (events,) = [o for o in OUTPUTS if o.table == "usage_events_rows"]
    assert tuple(name for name, _ in tables["usage_events_rows"]) == events.columns


def test_outputs_name_known_topics_and_distinct_tables() -> None:
    # a table-only output (the audit trail) names no topic
    assert {o.topic for o in OUTPUTS if o.topic} <= {spec.name for spec in topics.TOPICS}
    assert [o.table for o in OUTPUTS if not o.topic] == ["audit_log"]
    assert len({o.table for o in OUTPUTS}) == len(OUTPUTS)
    for output in OUTPUTS:
        assert issubclass(output.model, msgspec.Struct)


EXAMPLES = Path(__file__).resolve().parents[2] / "schemas" / "examples"
JSON_OUTPUTS = [o for o in OUTPUTS if o.fmt == JSON_EACH_ROW]


@pytest.mark.parametrize("output", JSON_OUTPUTS, ids=lambda o: o.name)
def test_a_field_without_a_column_fails_the_insert_loudly(
    output: Output, settings: Settings, tmp_path: Path
) -> None:
    """The contract's examples go in as the sink encodes them; one unknown key more fails.
    The examples are dated 2024: a retention of ten years keeps a TTL merge from dropping
    them before they are counted."""
    settings = settings.model_copy(update={"events_ttl_days": 3650, "stats_ttl_days": 3650})
    decoder = msgspec.json.Decoder(output.model)
    records = []
    for path in sorted((EXAMPLES / (output.topic or output.table) / "1").glob("*.json")):
        try:
            records.append(decoder.decode(path.read_bytes()))
        except msgspec.ValidationError:  # the topic's other kinds (a notification read)
            continue
    assert records, output.topic
    encoded = [msgspec.json.encode(record) for record in records]
    db = settings.clickhouse_database
    with embedded(tmp_path / "ch") as client:
        migrate(client, settings, progress=lambda _line: None)
        insert(client, output, db, b"\n".join(encoded))
        with pytest.raises(DatabaseError, match="surprise"):
            insert(client, output, db, encoded[0][:-1] + b', "surprise": 1}')
        stored = client.query(f"SELECT count() FROM {output.qualified_table(db)}").result_rows
    assert stored == [(len(records),)]
