"""The WebSocket bridge (DESIGN §7): Kafka → per-user live frames, client events → Kafka.

    create_bridge(settings) → Bridge        app.py: route, lifecycle, uvicorn options
    Sessions                                session.py: origin, auth, resume, frame loop
    ClientEvents                            client_events.py: what clients may send
    Connection                              connection.py: bounded send queue, its policy, state
    FrameWriter, AsgiWriter                 transport.py: how frames reach a socket (any ASGI)
    SlimWebSocketProtocol                   uvicorn_fast.py: uvicorn's protocol, direct writes
    BridgeApp                               asgi.py: what `keypulse ws` serves (lean per socket)
    Registry                                registry.py: connections by user, key sets
    Router                                  router.py: Kafka message → encoded frame → users
    KafkaFeed, BridgeProducer               kafka_feed.py, producer.py: the Kafka threads
    Replay                                  resume.py: missed alerts/notifications, bounded
    Monitor                                 monitoring.py: system_stats for admins
    (TokenBucket)                           core/limits.py: client frame rates
    (find_secret)                           core/secrets.py: what a key secret looks like
"""

from ws_bridge.app import UVICORN_WS_OPTIONS, Bridge, create_bridge
from ws_bridge.session import Limits

__all__ = ["UVICORN_WS_OPTIONS", "Bridge", "Limits", "create_bridge"]
