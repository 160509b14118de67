"""dedupe: drop exact repeats of a reading; pass a changed reading for the same key as an update.

State is the content hash of the last reading seen per (unit, timestamp), in a bounded LRU.
A redelivery of the very message that set the state (same `ingest_seq`) passes again: its
first pass may not have reached the next subject, and downstream effects are idempotent.
Repeats the LRU has forgotten are caught by persist's upsert, which ignores unchanged rows.
"""

from __future__ import annotations

from datetime import datetime

from cachetools import LRUCache

from schemas.messages import Reading

DEFAULT_CAPACITY = 1_000_000


class Dedupe:
    """Stage `dedupe`: `Reading` -> the same `Reading`, or nothing for an exact repeat."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._last: LRUCache[tuple[int, datetime], tuple[str, int]] = LRUCache(maxsize=capacity)
        self.duplicates = 0

    def __call__(self, reading: Reading) -> list[Reading]:
        key = reading.key
        seen = self._last.get(key)
        digest = reading.content_hash
        redelivery = seen is not None and reading.ingest_seq != 0 and seen[1] == reading.ingest_seq
        if seen is not None and seen[0] == digest and not redelivery:
            self.duplicates += 1
            return []
        self._last[key] = (digest, reading.ingest_seq)
        return [reading]
