"""Which tiers hold which sequence hash, and the Store/Remove events that record changes.

Why: matching walks tiers (G2 then G3), offload skips blocks a target already holds, and KV events
tell routers what is cached where. Pools report every arrival and departure here; events wait in a
queue until the caller drains them (no callbacks into foreign code from inside a pool operation).
A ``StoreEvent`` is queued when a hash first appears in a tier, a ``RemoveEvent`` when it leaves;
``event_id`` increases by one per event; dedup and re-matching emit nothing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kvtier.core.errors import RegistryError

__all__ = ["Remove", "RemoveEvent", "Store", "StoreEvent", "TierEvent", "TierRegistry"]


@dataclass(frozen=True, slots=True)
class StoreEvent:
    """A sequence hash first appeared in ``tier``."""

    event_id: int
    tier: str
    sequence_hash: int
    parent_sequence_hash: int | None
    block_hash: int | None = None


@dataclass(frozen=True, slots=True)
class RemoveEvent:
    """A sequence hash left ``tier``."""

    event_id: int
    tier: str
    sequence_hash: int


TierEvent = StoreEvent | RemoveEvent
Store = StoreEvent
Remove = RemoveEvent


class TierRegistry:
    """Sequence hash -> tiers holding it, plus a bounded queue of events.

    ``max_pending_events`` bounds memory when nobody drains: the oldest events are dropped and
    counted in ``dropped_events``. ``record_events=False`` keeps no events at all.
    """

    def __init__(self, *, record_events: bool = True, max_pending_events: int = 1_000_000) -> None:
        if max_pending_events <= 0:
            raise ValueError(f"max_pending_events must be > 0, got {max_pending_events}")
        self._record_events = record_events
        # hash -> bit mask of tiers: a dict of ints only, which the GC never walks (tuples or
        # lists per hash made every full collection visit a million objects)
        self._holders: dict[int, int] = {}
        self._bits: dict[str, int] = {}  # tier name -> its bit
        self._names: dict[int, tuple[str, ...]] = {0: ()}  # mask -> sorted tier names (cache)
        self._counts: dict[str, int] = {}
        self._events: deque[TierEvent] = deque(maxlen=max_pending_events)
        self._next_event_id = 1
        self._dropped = 0

    def _bit(self, tier: str) -> int:
        bit = self._bits.get(tier)
        if bit is None:
            if not isinstance(tier, str) or not tier:
                raise RegistryError(f"tier must be a non-empty str, got {tier!r}")
            bit = self._bits[tier] = 1 << len(self._bits)
        return bit

    def tiers_of(self, sequence_hash: int) -> tuple[str, ...]:
        """Tiers holding ``sequence_hash``, sorted by name (G1, G2, G3, ...)."""
        mask = self._holders.get(sequence_hash, 0)
        names = self._names.get(mask)
        if names is None:
            names = tuple(sorted(t for t, b in self._bits.items() if mask & b))
            self._names[mask] = names
        return names

    def holds(self, tier: str, sequence_hash: int) -> bool:
        bit = self._bits.get(tier)
        return bit is not None and bool(self._holders.get(sequence_hash, 0) & bit)

    def count(self, tier: str) -> int:
        """Number of sequence hashes ``tier`` holds."""
        return self._counts.get(tier, 0)

    def record_store(
        self,
        tier: str,
        sequence_hash: int,
        parent_sequence_hash: int | None = None,
        block_hash: int | None = None,
    ) -> None:
        bit, mask = self._bit(tier), self._holders.get(sequence_hash, 0)
        if mask & bit:
            raise RegistryError(f"tier {tier!r} already holds sequence hash {sequence_hash}")
        self._holders[sequence_hash] = mask | bit
        self._counts[tier] = self._counts.get(tier, 0) + 1
        if self._record_events:  # building a frozen event costs ~1 us: only when kept
            event = StoreEvent(
                self._next_event_id, tier, sequence_hash, parent_sequence_hash, block_hash
            )
            self._emit(event)
        else:
            self._next_event_id += 1

    def record_remove(self, tier: str, sequence_hash: int) -> None:
        bit, mask = self._bits.get(tier, 0), self._holders.get(sequence_hash, 0)
        if not mask & bit:
            raise RegistryError(f"tier {tier!r} does not hold sequence hash {sequence_hash}")
        if mask == bit:
            del self._holders[sequence_hash]
        else:
            self._holders[sequence_hash] = mask & ~bit
        self._counts[tier] -= 1
        if self._record_events:
            self._emit(RemoveEvent(self._next_event_id, tier, sequence_hash))
        else:
            self._next_event_id += 1

    def _emit(self, event: TierEvent) -> None:
        self._next_event_id += 1
        if len(self._events) == self._events.maxlen:
            self._dropped += 1
        self._events.append(event)

    @property
    def pending_events(self) -> int:
        return len(self._events)

    @property
    def dropped_events(self) -> int:
        """Events dropped because the queue was full (oldest first)."""
        return self._dropped

    def drain_events(self) -> list[TierEvent]:
        """All queued events, oldest first; the queue is empty afterwards."""
        events = list(self._events)
        self._events.clear()
        return events
