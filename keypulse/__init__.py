"""keypulse: the shared core every part stands on.

`keypulse.settings` (one validated settings object), `keypulse.clickhouse` and
`keypulse.kafka` (client factories), `keypulse.clock` (injectable time) and the
`keypulse.cli` entry point. `pipeline`, `api` and `ws_bridge` import from here and
from `schemas`, never from each other.
"""

__version__ = "0.1.0"
