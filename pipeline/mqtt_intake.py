"""Flow control for the bridge's MQTT connection: stop reading the socket while enough messages
wait in aiomqtt's queue, so a backlog stays at the broker instead of in the worker's memory.

The Receive Maximum should do this, but mosquitto 2.0 keeps sending past it once
acknowledgements flow: asking for 100 and acknowledging in batches of 50, a client was measured
with 13,650 messages unacknowledged, and the fleet bench's worker grew to 1 GiB with 220,000
messages queued. Once reading stops, TCP's window fills and the broker holds the rest, as it
must for unacknowledged QoS 1 messages anyway.

aiomqtt has no switch for this: it registers a reader on paho's socket that it cannot pause.
`Intake.install()` replaces that reader with the same loop (paho's `loop_read`, errors ending
the connection as in aiomqtt), which can be removed and added again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt


class Intake:
    """Pauses reading at `limit` queued messages, resumes at half of it."""

    def __init__(self, client: aiomqtt.Client, limit: int) -> None:
        self._client = client
        self._paho: Any = client._client  # private: see the module docstring
        self._queue: asyncio.Queue[Any] = client._queue
        self._limit = max(limit, 2)
        self._loop = asyncio.get_running_loop()
        self._fd = -1
        self.reading = False
        #: Times reading was paused, for the health endpoint and tests.
        self.pauses = 0

    def install(self) -> None:
        sock = self._paho.socket()
        if sock is None:
            return
        self._fd = sock.fileno()
        self._loop.remove_reader(self._fd)
        self._loop.add_reader(self._fd, self._read)
        self.reading = True

    def took(self) -> None:
        """Call after taking messages from the queue: reading resumes once it has room."""
        if not self.reading and self._fd >= 0 and self._queue.qsize() <= self._limit // 2:
            self._loop.add_reader(self._fd, self._read)
            self.reading = True

    def _read(self) -> None:
        try:
            while True:
                self._paho.loop_read()
                sock = self._paho._sock  # TLS may keep decoded bytes pending
                if hasattr(sock, "pending") and sock.pending() > 0:
                    continue
                break
        except Exception as exc:  # the connection broke: end the session, as aiomqtt does
            disconnected = self._client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)
            return
        if self._queue.qsize() >= self._limit and self.reading:
            self._loop.remove_reader(self._fd)
            self.reading = False
            self.pauses += 1
