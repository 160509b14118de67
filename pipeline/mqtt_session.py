"""The bridge's MQTT client: one connection to the broker, subscribe-only, QoS 1 with the
PUBACKs in the caller's hands, and reading paused while enough messages wait.

Why our own session layer and not a client library (measured side by side, and in every
`make bench` run against the old client and mosquitto_sub; see the README's "The MQTT client"):
paho, under aiomqtt, costs 88–98 µs of CPU per message on MQTT
5 (a properties object per packet, a task per message) and has no public way to hold a PUBACK
or to stop reading its socket; gmqtt acknowledges only after an `async` callback per message
(18–20 µs) and cannot pause reading either. The packet format is not ours: MQTT 5 packets are
read and written by `mqtt5`, a sans-IO codec in Rust (0.3 µs to read a PUBLISH here). What is
ours is the part a subscriber needs of the session rules: CONNECT and CONNACK, one SUBSCRIBE,
PUBLISH in, PUBACK out in the order the caller gives, keepalive, DISCONNECT.

MQTT 3.1.1, for brokers without 5 (nats-server's MQTT listener), has no codec library worth the
dependency for the handful of packets a subscriber sends and receives; `_V311` writes and reads
those by hand, after the OASIS 3.1.1 specification (§3.1 CONNECT … §3.14 DISCONNECT). The other
packets (PUBACK, PINGREQ, PINGRESP, DISCONNECT without properties) are the same bytes in both.

Flow control: with `limit` messages taken from the socket and not yet handed out, reading
stops (`transport.pause_reading`) until half of them are. mosquitto 2.0 keeps sending past the
Receive Maximum once acknowledgements flow, so the limit must hold on its own; with reading
stopped, TCP's window fills and the broker keeps the rest, as it must for unacknowledged QoS 1.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import mqtt5

from pipeline.config import MqttTarget

SESSION_NEVER_EXPIRES = 0xFFFFFFFF
_PINGREQ = b"\xc0\x00"
_DISCONNECT = b"\xe0\x00"
_PUBACK = b"\x40\x02"
#: How long a CONNECT or SUBSCRIBE may go unanswered.
ANSWER_TIMEOUT_S = 10.0


class MqttError(Exception):
    """The connection failed or broke."""


class Refused(MqttError):
    """The broker refused the connection (CONNACK) or the subscription (SUBACK)."""

    def __init__(self, what: str, code: int, *, no_mqtt5: bool = False) -> None:
        super().__init__(f"{what} refused by the broker (code {code})")
        self.code = code
        #: The broker answered an MQTT 5 CONNECT as a 3.1.1 broker: connect with 3.1.1.
        self.no_mqtt5 = no_mqtt5


@dataclass(slots=True)
class Message:
    topic: str
    payload: bytes
    #: None for QoS 0 (nothing to acknowledge).
    packet_id: int | None


@dataclass(slots=True)
class _ConnAck:
    code: int
    session_present: bool
    no_mqtt5: bool = False


@dataclass(slots=True)
class _SubAck:
    codes: list[int]


class _Pong:
    pass


_Packet = Message | _ConnAck | _SubAck | _Pong


class _V5:
    """MQTT 5 through the `mqtt5` codec."""

    level = 5

    @staticmethod
    def connect(
        client_id: str, target: MqttTarget, keepalive_s: int, receive_maximum: int
    ) -> bytes:
        return mqtt5.ConnectPacket(
            client_id,
            username=target.username,
            password=target.password.encode() if target.password is not None else None,
            clean_start=False,
            keep_alive=keepalive_s,
            session_expiry_interval=SESSION_NEVER_EXPIRES,
            receive_max=receive_maximum,
            topic_alias_max=0,  # every PUBLISH names its topic
        ).write()

    @staticmethod
    def subscribe(packet_id: int, filters: Sequence[str]) -> bytes:
        return mqtt5.SubscribePacket(
            packet_id, [mqtt5.TopicFilter(f, max_qos=mqtt5.QoS.AT_LEAST_ONCE) for f in filters]
        ).write()

    @staticmethod
    def read(view: memoryview) -> tuple[_Packet | None, int]:
        """One packet from the front of `view` and its length; IndexError if incomplete."""
        if len(view) >= 4 and view[0] == 0x20 and view[1] == 2:
            # A 3.1.1 CONNACK (a 5 one has properties, so is longer): no MQTT 5 here.
            return _ConnAck(view[3], False, no_mqtt5=True), 4
        packet, n = mqtt5.read(view)
        if type(packet) is mqtt5.PublishPacket:
            return Message(packet.topic, packet.payload, packet.packet_id), n
        if type(packet) is mqtt5.ConnAckPacket:
            return _ConnAck(int(packet.reason_code), packet.session_present), n
        if type(packet) is mqtt5.SubAckPacket:
            return _SubAck([int(c) for c in packet.reason_codes]), n
        if type(packet) is mqtt5.PingRespPacket:
            return _Pong(), n
        if type(packet) is mqtt5.DisconnectPacket:
            raise MqttError(f"the broker disconnected us ({packet.reason_code.name})")
        return None, n  # nothing a subscriber acts on


class _V311:
    """MQTT 3.1.1, written and read by hand (see the module docstring)."""

    level = 4

    @staticmethod
    def connect(client_id: str, target: MqttTarget, keepalive_s: int, _: int) -> bytes:
        flags = 0  # clean session off: the broker keeps the session and its messages
        payload = _string(client_id.encode())
        if target.username is not None:
            flags |= 0x80
            payload += _string(target.username.encode())
            if target.password is not None:
                flags |= 0x40
                payload += _string(target.password.encode())
        variable = _string(b"MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big")
        return _frame(0x10, variable + payload)

    @staticmethod
    def subscribe(packet_id: int, filters: Sequence[str]) -> bytes:
        wanted = b"".join(_string(f.encode()) + b"\x01" for f in filters)  # QoS 1 each
        return _frame(0x82, packet_id.to_bytes(2, "big") + wanted)

    @staticmethod
    def read(view: memoryview) -> tuple[_Packet | None, int]:
        first = view[0]
        length, start = _remaining_length(view)
        end = start + length
        if len(view) < end:
            raise IndexError("Not enough bytes")
        kind = first >> 4
        if kind == 3:
            qos = (first >> 1) & 3
            if qos > 1:
                raise MqttError("QoS 2 PUBLISH on a QoS 1 subscription")
            topic_end = start + 2 + int.from_bytes(view[start : start + 2], "big")
            packet_id = int.from_bytes(view[topic_end : topic_end + 2], "big") if qos else None
            body = topic_end + 2 if qos else topic_end
            topic = bytes(view[start + 2 : topic_end]).decode()
            return Message(topic, bytes(view[body:end]), packet_id), end
        if kind == 2:
            return _ConnAck(view[start + 1], bool(view[start] & 1)), end
        if kind == 9:
            return _SubAck(list(view[start + 2 : end])), end
        if kind == 13:
            return _Pong(), end
        return None, end


def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _frame(first: int, body: bytes) -> bytes:
    length, out = len(body), bytearray([first])
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


def _remaining_length(view: memoryview) -> tuple[int, int]:
    """The fixed header's remaining length and where the packet's body starts."""
    value, shift = 0, 0
    for position in range(1, 5):
        if position >= len(view):
            raise IndexError("Not enough bytes")
        byte = view[position]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position + 1
        shift += 7
    raise MqttError("malformed remaining length")


class Session(asyncio.Protocol):
    """One connection: `connect`, `subscribe`, then `ready`/`take` messages and `ack` them."""

    def __init__(self, limit: int, mqtt5_: bool) -> None:
        self._codec: type[_V5] | type[_V311] = _V5 if mqtt5_ else _V311
        self._limit = max(limit, 2)
        self._queue: collections.deque[Message] = collections.deque()
        self._rest = b""
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._answer: asyncio.Future[_ConnAck | _SubAck] | None = None
        self._waiter: asyncio.Future[None] | None = None
        #: Done once the connection ended; `error` says why, unless we closed it.
        self.closed: asyncio.Future[None] = loop.create_future()
        self.error: MqttError | None = None
        self._last_read = loop.time()
        self._keepalive: asyncio.Task[None] | None = None
        self.session_present = False
        #: Whether the socket is being read, and how often reading was paused (health, tests).
        self.reading = True
        self.pauses = 0

    @classmethod
    async def connect(
        cls,
        target: MqttTarget,
        client_id: str,
        *,
        mqtt5_: bool = True,
        receive_maximum: int = 10_000,
        keepalive_s: int = 30,
        limit: int | None = None,
    ) -> Session:
        """Connected and with the broker's CONNACK; `Refused` or `MqttError` otherwise."""
        loop = asyncio.get_running_loop()
        session = cls(limit or receive_maximum, mqtt5_)
        tls = ssl.create_default_context() if target.tls else None
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                await loop.create_connection(lambda: session, target.host, target.port, ssl=tls)
                packet = session._codec.connect(client_id, target, keepalive_s, receive_maximum)
                answer = await session._ask(packet)
        except (OSError, TimeoutError) as exc:
            session.abort()
            raise MqttError(f"cannot connect to {target!r}: {exc!r}") from exc
        assert isinstance(answer, _ConnAck)
        if answer.code:
            session.abort()
            raise Refused("connection", answer.code, no_mqtt5=answer.no_mqtt5)
        session.session_present = answer.session_present
        session._keepalive = loop.create_task(session._ping(keepalive_s))
        return session

    async def subscribe(self, filters: Sequence[str]) -> None:
        """Subscribe with QoS 1; `Refused` if the broker grants none for a filter."""
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT_S):
                answer = await self._ask(self._codec.subscribe(1, filters))
        except TimeoutError as exc:
            raise MqttError("no SUBACK in time") from exc
        assert isinstance(answer, _SubAck)
        for code in answer.codes:
            if code >= 0x80:
                raise Refused("subscription", code)

    async def ready(self) -> None:
        """Return once a message waits; raise `MqttError` if the connection ended first."""
        while not self._queue:
            if self.closed.done():
                raise self.error or MqttError("connection closed")
            self._waiter = self._loop.create_future()
            await asyncio.wait({self._waiter, self.closed}, return_when=asyncio.FIRST_COMPLETED)

    def take(self, most: int) -> list[Message]:
        """Up to `most` of the messages waiting, oldest first (none may be waiting)."""
        queue = self._queue
        n = min(most, len(queue))
        taken = [queue.popleft() for _ in range(n)]
        if not self.reading and len(queue) <= self._limit // 2 and self._transport is not None:
            self._parse()  # what arrived before reading stopped
            if len(queue) < self._limit:
                self._transport.resume_reading()
                self.reading = True
        return taken

    def queued(self) -> int:
        return len(self._queue)

    def ack(self, messages: Sequence[Message]) -> None:
        """PUBACK these, in this order, in one write (lost with the connection if it broke:
        the broker then sends them again)."""
        ids = [m.packet_id for m in messages if m.packet_id is not None]
        if ids and self._transport is not None and not self._transport.is_closing():
            self._transport.write(b"".join(_PUBACK + i.to_bytes(2, "big") for i in ids))

    async def close(self) -> None:
        """DISCONNECT (the session stays at the broker: it never expires) and close."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(_DISCONNECT)
            self._transport.close()
        self._stop_keepalive()
        self._end(None)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._stop_keepalive()

    async def _ask(self, packet: bytes) -> _ConnAck | _SubAck:
        answer: asyncio.Future[_ConnAck | _SubAck] = self._loop.create_future()
        self._answer = answer
        assert self._transport is not None
        self._transport.write(packet)
        either: set[asyncio.Future[Any]] = {answer, self.closed}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if answer.done():
            return answer.result()
        raise self.error or MqttError("connection closed before the broker answered")

    async def _ping(self, keepalive_s: int) -> None:
        """PINGREQ twice per keepalive; a connection that read nothing for 1.5 keepalives
        while reading is dead (while reading is paused, the PINGRESP waits in the socket)."""
        interval_s = max(keepalive_s / 2, 0.5)
        while self._transport is not None and not self._transport.is_closing():
            await asyncio.sleep(interval_s)
            if self.reading and self._loop.time() - self._last_read > 1.5 * keepalive_s:
                self._fail(MqttError(f"nothing from the broker for {1.5 * keepalive_s:.0f} s"))
                return
            self._transport.write(_PINGREQ)

    def _stop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()

    def _end(self, error: MqttError | None) -> None:
        if not self.closed.done():
            self.error = error
            self.closed.set_result(None)

    def _fail(self, exc: MqttError) -> None:
        self._end(exc)
        if self._transport is not None:
            self._transport.abort()
        self._stop_keepalive()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods of asyncio.Transport, not the class.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_keepalive()
        self._end(MqttError(f"connection lost: {exc!r}"))
        self._wake()

    def data_received(self, data: bytes) -> None:
        self._last_read = self._loop.time()
        self._rest = self._rest + data if self._rest else data
        self._parse()
        if (
            len(self._queue) >= self._limit
            and not self._awaiting()
            and self.reading
            and self._transport is not None
        ):
            self._transport.pause_reading()
            self.reading = False
            self.pauses += 1
        self._wake()

    def _parse(self) -> None:
        """Read packets from what arrived until the queue is full; the rest waits unparsed
        (at most one socket read: reading stops meanwhile)."""
        data = self._rest
        view = memoryview(data)
        read, queue = self._codec.read, self._queue
        # While a CONNACK or SUBACK is awaited, parsing goes past the limit: a session that
        # resumes with a backlog gets up to the Receive Maximum (3.1.1: the broker's inflight
        # window) of old messages before the SUBACK, and nobody takes any before it. The
        # broker sends no more until some are acknowledged, so this is bounded all the same.
        limit = self._limit if not self._awaiting() else len(queue) + len(data)
        pos, end = 0, len(data)
        try:
            while pos < end and len(queue) < limit:
                try:
                    packet, n = read(view[pos:])
                except IndexError:
                    break  # the rest of the packet is still on its way
                pos += n
                if type(packet) is Message:
                    queue.append(packet)
                elif isinstance(packet, (_ConnAck, _SubAck)):
                    self._answered(packet)
        except Exception as exc:  # malformed, or a DISCONNECT from the broker
            self._fail(exc if isinstance(exc, MqttError) else MqttError(f"bad packet: {exc!r}"))
            return
        finally:
            view.release()
        self._rest = data[pos:] if pos < end else b""

    def _awaiting(self) -> bool:
        return self._answer is not None and not self._answer.done()

    def _answered(self, packet: _ConnAck | _SubAck) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(packet)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
