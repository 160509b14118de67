"""dedupe: drop exact repeats of a reading; pass a changed reading for the same key as an update.

State is, per (unit, timestamp), the content hash and broker order of the newest reading seen,
in a bounded LRU. A reading is dropped only when it is newer than that state and has the same
content: then the row already holds what it would write. Everything else passes on, and
persist's upsert, which applies a reading only if it is newer than the row, decides:

* a reading older than the state (a redelivery that arrives after newer messages, after a
  crash) passes without touching the state;
* a reading that came through a JetStream redelivery (or a replay of a previous holder's
  messages after a failover) never sets the state, because after a restart the LRU is empty
  and such a reading may be older than what the row holds: were it to set the state, a later
  genuine repeat of its (stale) value would be dropped and lost. It *clears* the state of its
  key instead: it may be newer than the state, and then the row no longer holds the state's
  values (X, then Y redelivered, then X again must store the second X);
* the very message that set the state (same order) passes again: its first pass may not
  have reached the next subject, and downstream effects are idempotent.

Repeats the LRU has forgotten are caught by persist's upsert, which ignores unchanged rows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from datetime import datetime
from typing import Protocol, TypeVar

DEFAULT_CAPACITY = 100_000

Key = Hashable
State = tuple[str, tuple[datetime, int]]


class Keyed(Protocol):
    """What dedupe needs of a reading or a BESS sample."""

    @property
    def key(self) -> Hashable: ...

    @property
    def order(self) -> tuple[datetime, int]: ...

    @property
    def content_hash(self) -> str: ...

    @property
    def redelivered(self) -> bool: ...


R = TypeVar("R", bound=Keyed)


class _Lru:
    """The least recently used key goes first once `capacity` is reached.

    Hand-written on OrderedDict, whose reordering is in C: cachetools' LRUCache took 15 µs per
    lookup and update here, about a tenth of the fused pipeline's whole time per reading;
    this takes 1 µs."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._data: OrderedDict[Key, State] = OrderedDict()

    def get(self, key: Key) -> State | None:
        state = self._data.get(key)
        if state is not None:
            self._data.move_to_end(key)
        return state

    def forget(self, key: Key) -> None:
        self._data.pop(key, None)

    def __setitem__(self, key: Key, state: State) -> None:
        self._data[key] = state
        self._data.move_to_end(key)
        if len(self._data) > self._capacity:
            self._data.popitem(last=False)


class Dedupe:
    """Stage `dedupe`: a reading (or BESS sample) -> the same, or nothing for an exact repeat.

    One instance serves one kind: the keys of meters and devices never meet."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._last = _Lru(capacity)
        self.duplicates = 0

    def __call__(self, reading: R) -> list[R]:
        if reading.redelivered:
            self._last.forget(reading.key)
            return [reading]
        key = reading.key
        seen = self._last.get(key)
        digest, order = reading.content_hash, reading.order
        if seen is not None and order <= seen[1]:
            return [reading]  # the same message again, or an older one: persist decides
        if seen is not None and seen[0] == digest:
            self.duplicates += 1
            self._last[key] = (digest, order)
            return []
        self._last[key] = (digest, order)
        return [reading]
