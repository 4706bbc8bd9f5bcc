"""keypulse: the top floor. The `keypulse` console script (`keypulse.cli`), its commands
(`keypulse.commands`) and the traffic generator (`keypulse.traffic`): the only code that
imports every part (`api`, `pipeline`, `ws_bridge`, `infra`) to wire them together."""

from core import __version__

__all__ = ["__version__"]
