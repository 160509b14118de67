"""Publishing to JetStream: a batch of outputs, returned once every one is stored, each
subject's messages in order even when some publishes fail (a stream leader being elected)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import nats.errors
import structlog

from pipeline.broker import declare_streams
from pipeline.claims import Gate
from pipeline.retry import Backoff
from pipeline.topology import StreamPolicy

log = structlog.get_logger("pipeline.publishing")

#: (subject, body, headers) of one message to publish.
Outbound = tuple[str, bytes, dict[str, str]]


class JetStreamOut:
    """Publishes a batch of outputs and returns once JetStream has stored every one, keeping
    the order of the messages of each subject even when some publishes fail.

    A subject is one unit's or one device's (`valid.{org}.{einheit}`, `messwerte.{org}.{einheit}`),
    and their order is the order dedupe and consumers rely on. Were a batch published all at
    once and its first message lost while a leader is elected, the retry would store it after
    the next message of the same subject. So a batch goes out in waves: the first message of
    every subject, then the second, and so on; a wave is published concurrently (one round
    trip for a fleet, whose batches rarely hold a unit twice), and the next goes out only
    once the last is stored. A failed publish is retried with the same `Nats-Msg-Id`, so one
    that was stored after all is not stored twice."""

    def __init__(
        self,
        js: Any,
        stop: asyncio.Event,
        timeout_s: float = 10.0,
        streams: StreamPolicy | None = None,
        gate: Gate | None = None,
    ) -> None:
        self._js = js
        self._stop = stop
        self._timeout_s = timeout_s
        self.streams = streams
        #: A singleton's claims: a publish that has to be retried is not once they are lost.
        self.gate = gate

    async def publish(self, outbound: Sequence[Outbound]) -> None:
        for wave in waves(outbound):
            await self._store(wave)

    async def _store(self, wave: list[Outbound]) -> None:
        backoff = Backoff(self._stop)
        left = wave
        while True:
            if self.gate is not None:
                self.gate.check()
            futures: list[asyncio.Future[Any]] = []
            error: BaseException | None = None
            try:
                for subject, body, headers in left:
                    futures.append(
                        await self._js.publish_async(subject, body, headers=headers or None)
                    )
                if futures:
                    await asyncio.wait(futures, timeout=self._timeout_s)
            except Exception as exc:  # NATS away: what was not handed over goes again
                error = exc
            failed = []
            for position, out in enumerate(left):
                future = futures[position] if position < len(futures) else None
                if future is not None and future.done() and not future.cancelled():
                    if future.exception() is None:
                        continue
                    error = error or future.exception()
                elif future is not None:
                    future.cancel()  # no answer in time: published again below
                    error = error or TimeoutError("no acknowledgement in time")
                failed.append(out)
            if not failed:
                return
            left = failed
            log.warning("publish failed, retrying", error=repr(error), messages=len(left))
            if isinstance(error, nats.errors.NoRespondersError):
                # No stream takes the subject: it was lost (or its leader is being elected).
                await redeclare(self._js, self.streams)
            await backoff.wait()


def waves(outbound: Sequence[Outbound]) -> list[list[Outbound]]:
    """The n-th wave holds the n-th message of every subject, in the batch's order."""
    result: list[list[Outbound]] = []
    seen: dict[str, int] = {}
    for out in outbound:
        n = seen.get(out[0], 0)
        seen[out[0]] = n + 1
        if n == len(result):
            result.append([])
        result[n].append(out)
    return result


async def redeclare(js: Any, streams: StreamPolicy | None) -> None:
    """Create the streams again that a server lost (deleted, or restarted without its store)."""
    try:
        await declare_streams(js, streams)
        log.warning("streams declared again")
    except Exception as exc:
        log.debug("streams could not be declared", error=repr(exc))
