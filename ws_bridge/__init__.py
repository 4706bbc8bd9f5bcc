"""The WebSocket bridge (DESIGN §7): Kafka → per-user live frames, client events → Kafka.

    create_bridge(settings) → Bridge        app.py: route, lifecycle, uvicorn options
    Sessions                                session.py: origin, auth, resume, frame loop
    ClientEvents                            client_events.py: what clients may send
    Connection                              connection.py: bounded queue, direct socket writes
    BridgeApp, SlimWebSocketProtocol        asgi.py: what `keypulse ws` serves (lean per socket)
    Registry                                registry.py: connections by user, key sets
    Router                                  router.py: Kafka message → encoded frame → users
    KafkaFeed, BridgeProducer               kafka_feed.py, producer.py: the Kafka threads
    replay                                  resume.py: missed alerts/notifications
    Monitor                                 monitoring.py: system_stats for admins
"""

from ws_bridge.app import UVICORN_WS_OPTIONS, Bridge, create_bridge
from ws_bridge.session import Limits

__all__ = ["UVICORN_WS_OPTIONS", "Bridge", "Limits", "create_bridge"]
