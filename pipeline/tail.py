"""`pipeline tail`: a downstream consumer's view of the output, messwerte as they are published.

It reads stream `MESSWERTE` like any consumer would: an ordered ephemeral consumer by default
(nothing left behind on the server), or a durable one (`--durable NAME`) that resumes where it
stopped, acknowledging what it printed. Filters narrow the subject
`messwerte.{organizationId}.{einheitId}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TextIO
from uuid import UUID

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from schemas.output import MesswertMessage

STREAM = "MESSWERTE"
#: How long one wait for a message lasts before the loop looks at stop and count again.
POLL_S = 0.5


@dataclass(frozen=True)
class TailOptions:
    organization_id: UUID | None = None
    einheit_id: int | None = None
    durable: str | None = None
    from_start: bool = False
    count: int | None = None
    as_json: bool = False

    @property
    def subject(self) -> str:
        org = self.organization_id or "*"
        unit = self.einheit_id or "*"
        return f"messwerte.{org}.{unit}"


def line(message: MesswertMessage) -> str:
    """One published interval, for people."""
    zeit = message.zeit.astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (
        f"{zeit}  org {message.organization_id}  einheit {message.einheit_id:>6}  "
        f"verbrauch {message.verbrauch:>10} kWh  einspeisung {message.einspeisung:>10} kWh  "
        f"{message.anzahl_rohwerte:>3} readings  {message.quelle}  rev {message.revision}"
    )


async def tail(servers: list[str], options: TailOptions, out: TextIO) -> int:
    """Print messages until `count` were printed or SIGINT/SIGTERM; returns how many."""
    nc = await nats.connect(servers, max_reconnect_attempts=-1, name="messwerte-tail")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    printed = 0
    try:
        next_msg = await _subscribe(nc.jetstream(), options)
        while not stop.is_set() and (options.count is None or printed < options.count):
            try:
                msg = await next_msg()
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            message = MesswertMessage.model_validate_json(msg.data)
            text = json.dumps(json.loads(msg.data)) if options.as_json else line(message)
            print(text, file=out, flush=True)
            printed += 1
            if options.durable:
                await msg.ack()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await nc.drain()
    return printed


async def _subscribe(js: Any, options: TailOptions) -> Callable[[], Awaitable[Any]]:
    """A function that waits up to `POLL_S` for the next message."""
    deliver = DeliverPolicy.ALL if options.from_start else DeliverPolicy.NEW
    if options.durable:
        # A pull consumer: it keeps its place on the server while no one reads, and an
        # existing one is bound as it is (where it stopped), whatever `--from-start` says.
        sub = await js.pull_subscribe(
            options.subject,
            durable=options.durable,
            stream=STREAM,
            config=ConsumerConfig(deliver_policy=deliver, ack_policy=AckPolicy.EXPLICIT),
        )

        async def fetch_one() -> Any:
            [msg] = await sub.fetch(1, timeout=POLL_S)
            return msg

        return fetch_one
    ordered = await js.subscribe(
        options.subject, stream=STREAM, ordered_consumer=True, deliver_policy=deliver
    )
    return lambda: ordered.next_msg(timeout=POLL_S)
