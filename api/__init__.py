"""The HTTP API (FastAPI). `create_app(settings)` builds it; `keypulse api` serves it alone and
`keypulse run` serves it beside the WebSocket bridge and the pipeline in one process.

Today it has health, Prometheus metrics and system stats; ingest, queries, alert rules and
notifications come with the HTTP API issue.
"""

from api.app import create_app

__all__ = ["create_app"]
