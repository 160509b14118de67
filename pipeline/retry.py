"""Waiting and retrying: exponential backoff with jitter, and which errors are worth a retry.

A stage error is either *transient* (the database, NATS or the network is away, a timeout, a
lock conflict: the same input will succeed later, so it is retried with backoff for as long as
it takes, its input held in progress) or *poison* (this input makes the stage raise, and would
on every retry: it goes to the DLQ so the messages behind it are not held up). `is_transient`
draws that line. An error it does not know counts as poison only once the same message has
failed with it `POISON_AFTER_FAILURES` times in a row, so that an odd error thrown while a
connection breaks cannot send a good message to the DLQ.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import nats.errors

MAX_BACKOFF_S = 5.0
#: Consecutive non-transient failures of one message before it is declared poison.
POISON_AFTER_FAILURES = 3

#: Errors that say "not now" rather than "not this message". Every PostgreSQL error that is not
#: about the data counts too (see `is_transient`).
_TRANSIENT: tuple[type[BaseException], ...] = (
    OSError,  # includes ConnectionError and refused or reset sockets
    TimeoutError,
    asyncpg.InterfaceError,  # connection closed, pool closing
    asyncpg.InternalClientError,  # the client's state after a connection broke mid-call
    nats.errors.Error,
)

#: What the database says about the data of one message, not about itself.
_ABOUT_THE_DATA: tuple[type[BaseException], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same input later can succeed.

    A database error that is not about the message's data (a missing table after a failed
    migration, a permission revoked) is also retried: it is the deployment that is wrong, and
    sending every message to the DLQ until someone fixes it would be worse than waiting.
    """
    if isinstance(exc, _ABOUT_THE_DATA):
        return False
    return isinstance(exc, (*_TRANSIENT, asyncpg.PostgresError))


async def first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    """Return when any of `events` is set, or after `timeout_s`."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Abandoned(Exception):
    """The worker is stopping; the batch stays unacknowledged and will be redelivered."""


class Backoff:
    """Exponential backoff with full jitter, capped; `wait` gives up when `stop` is set."""

    def __init__(
        self, stop: asyncio.Event, first_s: float = 0.1, cap_s: float = MAX_BACKOFF_S
    ) -> None:
        self._stop = stop
        self._first_s = first_s
        self._cap_s = cap_s
        self._next_s = first_s
        self.attempts = 0

    async def wait(self) -> None:
        delay = random.uniform(self._next_s / 2, self._next_s)
        self._next_s = min(self._next_s * 2, self._cap_s)
        self.attempts += 1
        try:
            await asyncio.wait_for(self._stop.wait(), timeout=delay)
        except TimeoutError:
            return
        raise Abandoned
