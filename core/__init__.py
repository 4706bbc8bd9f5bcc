"""core: the foundation every part stands on, and a leaf: it imports only `schemas`.

`core.settings` (one validated settings object), `core.errors`, `core.clock` (injectable
time), `core.auth` (JWTs), `core.kafka` and `core.clickhouse` (client factories),
`core.metrics` (the registry `/metrics` reads) and `core.topics` (topic names and specs).
`pipeline`, `api`, `ws_bridge` and `infra` stand on it and never import each other; the CLI
(`keypulse`) is the top floor that wires them. docs/layers.md draws the floors, and
`make lint` checks them.
"""

__version__ = "0.1.0"
