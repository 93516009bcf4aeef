"""The offload queue: which registered blocks to copy to the next tier, in what order.

Why: offload bandwidth is finite, so requests wait here ordered by (priority, arrival): higher
priority first, then first come first served (as Dynamo KVBM orders them). A request is skipped,
not copied, when the target tier already holds its sequence hash, whether it did when queued or
only by the time the request comes up. Each request carries a payload (typically a handle that
keeps the source block alive); skipped and cancelled requests are handed back, never dropped, so
their payloads can be released.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Generic, NamedTuple, Protocol, TypeVar

__all__ = ["HoldsHashes", "OffloadBatch", "OffloadQueue", "OffloadRequest"]

T = TypeVar("T")


class HoldsHashes(Protocol):
    """What the queue needs to know about its target (a BlockPool fits)."""

    def contains(self, sequence_hash: int) -> bool: ...


@dataclass(frozen=True, slots=True)
class OffloadRequest(Generic[T]):
    sequence_hash: int
    priority: int
    arrival: int
    payload: T


class OffloadBatch(NamedTuple, Generic[T]):
    ready: list[OffloadRequest[T]]  # copy these, in this order
    skipped: list[OffloadRequest[T]]  # the target already holds these


class OffloadQueue(Generic[T]):
    """Pending offloads to one target; one request per sequence hash."""

    def __init__(self, target: HoldsHashes) -> None:
        self._target = target
        self._heap: list[tuple[int, int, int]] = []  # (-priority, arrival, hash); lazy deletion
        self._pending: dict[int, OffloadRequest[T]] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, sequence_hash: int) -> bool:
        return sequence_hash in self._pending

    def push(self, sequence_hash: int, payload: T, *, priority: int = 0) -> bool:
        """Queue an offload; False (nothing queued) if the target holds it or it is queued."""
        if sequence_hash in self._pending or self._target.contains(sequence_hash):
            return False
        self._arrivals += 1
        request = OffloadRequest(sequence_hash, priority, self._arrivals, payload)
        self._pending[sequence_hash] = request
        heapq.heappush(self._heap, (-priority, request.arrival, sequence_hash))
        return True

    def cancel(self, sequence_hash: int) -> OffloadRequest[T] | None:
        """Withdraw a queued request (e.g. its source went away); returns it, or None."""
        request = self._pending.pop(sequence_hash, None)
        if len(self._heap) > 2 * len(self._pending) + 1024:  # mostly cancelled: compact
            self._heap = sorted((-r.priority, r.arrival, h) for h, r in self._pending.items())
        return request

    def pop(self, max_items: int) -> OffloadBatch[T]:
        """Up to ``max_items`` requests to copy now, plus those skipped on the way."""
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        batch: OffloadBatch[T] = OffloadBatch([], [])
        while self._heap and len(batch.ready) < max_items:
            _, arrival, h = heapq.heappop(self._heap)
            request = self._pending.get(h)
            if request is None or request.arrival != arrival:
                continue  # cancelled
            del self._pending[h]
            (batch.skipped if self._target.contains(h) else batch.ready).append(request)
        return batch
