"""Claims: which replica holds a singleton (the MQTT session, validate and dedupe of a device
kind, an outbox's publisher) at a time, design §14.

A claim is a key in the JetStream key-value bucket `pipeline_claims` (replicated like every
stream). Its value names the holder. The bucket's TTL is the lease: a key that is not renewed
expires on the server, after which another replica can create it. nats-py applies a per-key
TTL only on create, so a renewed key would never expire; the bucket's `max_age` applies to
every write, renewals included, which is what a lease needs.

* **Taking**: `create` succeeds only when the key does not exist (never written, expired, or
  released by a holder that stopped cleanly).
* **Renewing**: `update` with the revision we last wrote (compare-and-set), every fifth of
  the lease. A renewal whose answer was lost is found out on the next one (wrong revision, but
  the value still names us): we adopt the revision.
* **Fencing**: a holder counts its lease from the moment it *sent* the last successful
  renewal, and stops at three quarters of the TTL, while the server keeps the key a full TTL
  from when it *stored* that renewal. So a holder that is cut off or hangs stops before anyone
  else can start, on its own clock, without trusting clocks to agree. Components ask
  `Gate.valid()` right before each effect (PUBACK, publishing outputs, committing), and the
  outbox publisher also fences in the database (`pipeline/publisher.py`).
* **Order**: a worker takes its claims one at a time in name order and, when it loses one,
  gives up every claim after it. Two workers that want the same claims therefore cannot each
  hold a part and wait for the other: one becomes active for all of them, the other standby.

Hand-written on nats-py's KV calls: nats-py has no lease or leader-election helper, and
consumer priority groups (pinned clients) cover only a consumer, not the MQTT session or an
outbox.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats.js.errors
import structlog
from nats.js.api import KeyValueConfig, StorageType

from pipeline.retry import first_of

log = structlog.get_logger("pipeline.claims")

BUCKET = "pipeline_claims"
#: Part of the TTL a holder may act on after the renewal it sent last.
FENCE_FRACTION = 0.75
#: Renewals per TTL.
RENEWALS_PER_TTL = 5
#: The TTL as a part of PIPELINE_FAILOVER_SECONDS: the rest is the standby's polling and the
#: server's expiry, so a dead holder's claim is taken within the failover time.
TTL_FRACTION = 0.85
RELEASED = "released"


def new_holder_id() -> str:
    """Unique per process: a restarted worker is a new holder and waits out the old claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Fenced(Exception):
    """This worker no longer holds a claim it needs: stop before the next effect."""


@dataclass
class Lease:
    """One claim as this worker sees it."""

    name: str
    held: bool = False
    revision: int = 0
    #: Monotonic time after which we may no longer act on it.
    deadline: float = 0.0
    renew_at: float = 0.0
    since: datetime | None = None
    #: Who holds it, as last read (None: free or unknown).
    holder: str | None = None
    takeovers: int = 0

    def valid(self) -> bool:
        return self.held and time.monotonic() < self.deadline


@dataclass
class Gate:
    """What one component needs to hold before it may act: some claims, all at once."""

    names: tuple[str, ...]
    _claims: Claims
    #: Set while the component acts under the gate (for `/health`: acting on a lost claim).
    acting: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def valid(self) -> bool:
        return all(self._claims.leases[n].valid() for n in self.names)

    async def first_replay(self, consumer: str, floor: int) -> bool:
        return await self._claims.first_replay(consumer, floor)

    def check(self) -> None:
        """Raise `Fenced` unless every claim is held."""
        if not self.valid():
            raise Fenced(f"claim lost: {', '.join(self.names)}")

    async def acquired(self, stop: asyncio.Event) -> bool:
        """Wait until every claim is held; False if `stop` came first."""
        while not stop.is_set():
            if self.valid():
                return True
            self._changed.clear()
            await first_of(stop, self._changed, timeout_s=self._claims.tick_s)
        return False

    async def lost(self, stop: asyncio.Event) -> None:
        """Return once a claim is no longer held (or `stop` is set)."""
        while not stop.is_set() and self.valid():
            self._changed.clear()
            await first_of(stop, self._changed, timeout_s=self._claims.tick_s)

    async def tried(self, stop: asyncio.Event) -> None:
        """Return once the claims were tried at least once (or `stop` is set)."""
        await first_of(stop, self._claims.tried)

    @property
    def role(self) -> str:
        return "active" if self.valid() else "standby"


class Claims:
    """This worker's claims in the bucket, taken in name order and renewed by `run()`."""

    def __init__(self, kv: Any, holder: str, ttl_s: float) -> None:
        self._kv = kv
        self.holder = holder
        self.ttl_s = ttl_s
        self.tick_s = min(0.5, ttl_s / 20)
        self.leases: dict[str, Lease] = {}
        self._gates: list[Gate] = []
        #: Set once every claim was tried at least once: a component that finds its gate
        #: closed after that is a standby, not one whose claims are still being taken.
        self.tried = asyncio.Event()

    @classmethod
    async def open(
        cls, js: Any, *, failover_s: float, replicas: int = 1, holder: str | None = None
    ) -> Claims:
        """The bucket (created if missing) and an empty set of claims for `holder`."""
        ttl_s = failover_s * TTL_FRACTION
        try:
            kv = await js.key_value(BUCKET)
            info = await js.stream_info(f"KV_{BUCKET}")
            existing = info.config.max_age or ttl_s
            if abs(existing - ttl_s) > 0.01:
                # The bucket's TTL is what the standbys go by: act on it, not on our setting.
                log.warning(
                    "claims bucket has another TTL; PIPELINE_FAILOVER_SECONDS differs between "
                    "workers",
                    bucket_ttl_s=existing,
                    configured_ttl_s=ttl_s,
                )
                ttl_s = existing
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=BUCKET,
                    history=1,
                    ttl=ttl_s,
                    replicas=replicas,
                    storage=StorageType.FILE,
                    description="which replica holds which singleton (design §14)",
                )
            )
        return cls(kv, holder or new_holder_id(), ttl_s)

    def gate(self, names: Iterable[str]) -> Gate:
        names = tuple(sorted(set(names)))
        for name in names:
            self.leases.setdefault(name, Lease(name))
        gate = Gate(names, self)
        self._gates.append(gate)
        return gate

    # --- the loop -------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Take, renew and give up claims until `stop`; then release what we hold."""
        try:
            while not stop.is_set():
                await self._step()
                self.tried.set()
                await first_of(stop, timeout_s=self.tick_s)
        finally:
            await self.release()

    async def _step(self) -> None:
        ordered = [self.leases[name] for name in sorted(self.leases)]
        for position, lease in enumerate(ordered):
            if lease.held:
                if time.monotonic() >= lease.renew_at:
                    await self._renew(lease)
                if not lease.valid():
                    self._lose(lease, "lease ran out")
            if not lease.held:
                # Later claims wait for this one: give them up, then try to take it.
                for later in ordered[position + 1 :]:
                    if later.held:
                        await self._give_up(later)
                await self._take(lease)
                if not lease.held:
                    break
        self._notify()

    def _bounded_s(self) -> float:
        """How long one call may take without letting a held lease run past its deadline."""
        deadlines = [lease.deadline for lease in self.leases.values() if lease.held]
        left = min(deadlines, default=time.monotonic() + 2.0) - time.monotonic()
        return max(0.05, min(2.0, left))

    def _value(self, lease: Lease) -> bytes:
        return json.dumps(
            {"holder": self.holder, "claim": lease.name, "since": _iso(lease.since)}
        ).encode()

    async def _take(self, lease: Lease) -> None:
        sent = time.monotonic()
        lease.since = datetime.now(UTC)
        try:
            revision = await asyncio.wait_for(
                self._kv.create(lease.name, self._value(lease)), self._bounded_s()
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._adopt_if_ours(lease, sent)
            return
        except Exception as exc:
            log.debug("claim not taken", claim=lease.name, error=repr(exc))
            return
        self._hold(lease, revision, sent)
        lease.takeovers += 1
        log.info("claim taken", claim=lease.name, holder=self.holder)

    async def _renew(self, lease: Lease) -> None:
        sent = time.monotonic()
        try:
            revision = await asyncio.wait_for(
                self._kv.update(lease.name, self._value(lease), last=lease.revision),
                self._bounded_s(),
            )
        except nats.js.errors.KeyWrongLastSequenceError:
            await self._adopt_if_ours(lease, sent)
            return
        except Exception as exc:  # NATS away, a stream leader being elected: try again soon
            log.info("claim not renewed", claim=lease.name, error=repr(exc))
            lease.renew_at = time.monotonic() + self.tick_s
            return
        self._hold(lease, revision, sent)

    async def _adopt_if_ours(self, lease: Lease, sent: float) -> None:
        """The key exists at another revision: ours (an answer we missed), or someone else's."""
        try:
            entry = await asyncio.wait_for(self._kv.get(lease.name), self._bounded_s())
            holder = json.loads(entry.value or b"{}").get("holder")
        except nats.js.errors.KeyNotFoundError:
            lease.holder = None
            return
        except Exception as exc:
            log.debug("claim not readable", claim=lease.name, error=repr(exc))
            return
        lease.holder = holder
        if holder != self.holder:
            if lease.held:
                self._lose(lease, f"taken by {holder}")
            return
        try:  # ours: write it again at the revision we now know, which also renews it
            revision = await asyncio.wait_for(
                self._kv.update(lease.name, self._value(lease), last=entry.revision),
                self._bounded_s(),
            )
        except Exception as exc:
            log.debug("claim not adopted", claim=lease.name, error=repr(exc))
            return
        self._hold(lease, revision, sent)

    def _hold(self, lease: Lease, revision: int, sent: float) -> None:
        lease.held, lease.revision, lease.holder = True, revision, self.holder
        lease.deadline = sent + self.ttl_s * FENCE_FRACTION
        lease.renew_at = sent + self.ttl_s / RENEWALS_PER_TTL

    def _lose(self, lease: Lease, why: str) -> None:
        if lease.held and why != RELEASED:
            log.warning("claim lost", claim=lease.name, reason=why)
        lease.held = False
        lease.deadline = 0.0

    async def _give_up(self, lease: Lease, why: str = "a claim before it was lost") -> None:
        """Release a claim we hold but may not use (one before it in the order was lost)."""
        revision = lease.revision
        self._lose(lease, why)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kv.delete(lease.name, last=revision), self._bounded_s())

    async def release(self) -> None:
        """Give up every claim at once, so a standby takes over without waiting for the TTL."""
        held = [lease for lease in self.leases.values() if lease.held]
        for lease in held:
            await self._give_up(lease, RELEASED)
        if held:
            log.info("claims released", claims=[lease.name for lease in held])
        self._notify()

    def _notify(self) -> None:
        for gate in self._gates:
            gate._changed.set()

    async def first_replay(self, consumer: str, floor: int) -> bool:
        """Whether a holder taking over `consumer` may replay what is pending above `floor`:
        once per floor, so that a message that kills every worker replaying it is left to
        JetStream's redelivery count (and `max_deliver`) after the first attempt."""
        key = f"replay.{consumer}"
        try:
            entry = await asyncio.wait_for(self._kv.get(key), 2.0)
            if entry.value == str(floor).encode():
                return False
        except nats.js.errors.KeyNotFoundError:
            pass
        except Exception:
            return True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._kv.put(key, str(floor).encode()), 2.0)
        return True

    # --- health ---------------------------------------------------------------------------

    def status(self) -> tuple[bool, dict[str, Any]]:
        """Healthy unless a component acts under a claim this worker no longer holds."""
        healthy = not any(gate.acting and not gate.valid() for gate in self._gates)
        claims = {
            lease.name: {
                "role": "active" if lease.valid() else "standby",
                "holder": lease.holder,
                "since": _iso(lease.since) if lease.valid() else None,
                "takeovers": lease.takeovers,
            }
            for lease in self.leases.values()
        }
        return healthy, {"holder": self.holder, "ttl_seconds": self.ttl_s, "claims": claims}


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at else None
