"""Broker factory: the NATS connection (through FastStream's `NatsBroker`) and stream set-up.

Reconnects forever with backoff (nats-py adds jitter). Streams are declared idempotently at
start-up: created when missing, updated when they exist, left as they are (with a warning)
when an existing stream cannot take the change, such as its retention policy.
"""

from __future__ import annotations

from typing import Any

import structlog
from faststream.nats import NatsBroker
from nats.js.errors import BadRequestError, NotFoundError

from pipeline.topology import STREAMS, StreamPolicy

log = structlog.get_logger("pipeline.broker")


def make_broker(servers: list[str], name: str = "messwerte-pipeline") -> NatsBroker:
    return NatsBroker(
        servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=5,
        # A node that hangs (SIGSTOP, a partition) closes no socket: only unanswered pings
        # tell. Three seconds apart, two outstanding, its clients move to another node within
        # 9 s, inside the 30 s a cluster may take to carry on (design §14); 10 s and 3 left
        # them on it for up to 40 s (the cluster suite's SIGSTOP caught it when both workers
        # were connected to the paused node).
        ping_interval=3,
        max_outstanding_pings=2,
        pending_size=8 * 1024 * 1024,
        log_level=30,
    )


async def declare_streams(js: Any, policy: StreamPolicy | None = None) -> None:
    """Every stream of the topology, as `policy` says (copies, retention)."""
    for stream in STREAMS:
        config = stream.config(policy)
        try:
            await js.stream_info(stream.name)
        except NotFoundError:
            await js.add_stream(config)
            log.info("stream created", stream=stream.name)
            continue
        try:
            await js.update_stream(config)
        except BadRequestError as exc:
            log.warning(
                "stream kept with its existing configuration", stream=stream.name, error=str(exc)
            )
