"""KV events for cache-aware routers, in vLLM's KV-event wire format.

A router (Dynamo's, llm-d's, vLLM's own) keeps an index of which engine holds which prefix. vLLM
publishes what its G1 pool stores and evicts; kvtier publishes what G2 (medium ``"CPU"``) and G3
(medium ``"DISK"``) store and evict, on the same wire so the same subscriber code reads both:

- a ZMQ PUB socket sends three frames per batch: ``topic``, an 8-byte big-endian sequence number,
  and the msgpack payload (so a subscriber detects gaps: sequence numbers are consecutive);
- the payload is an array ``[timestamp, [event, ...], data_parallel_rank]``;
- each event is a map tagged as msgspec tags vLLM's structs: ``{"type": "BlockStored", ...}``,
  ``{"type": "BlockRemoved", ...}``, ``{"type": "AllBlocksCleared"}``;
- an optional ROUTER replay socket answers ``[b"", start_seq(8 bytes)]`` with every buffered batch
  from that number on, then an end marker whose sequence number is -1 (as vLLM 0.32 does).

The wire format is ``kvtier.ops.event_wire``, the sockets ``kvtier.ops.event_stream``
(``KvEventSubscriber`` imports from here too, as docs/operations.md shows). This module maps the
registry's events onto the wire.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence

from kvtier.core.registry import RemoveEvent, StoreEvent, TierEvent
from kvtier.ops.event_stream import KvEventSubscriber as KvEventSubscriber
from kvtier.ops.event_wire import TIER_MEDIUM, BlockRemoved, BlockStored, KvEvent


def events_from_tier_events(
    tier_events: Iterable[TierEvent],
    block_size: int,
    tokens_of: Callable[[int], Sequence[int] | None] | None = None,
    tiers: Collection[str] = ("G2", "G3"),
) -> list[KvEvent]:
    """Map the registry's Store/Remove events to wire events, order kept.

    Consecutive stores in one tier that form a chain (each one's parent is the previous one's
    hash) become one ``BlockStored`` whose ``parent_block_hash`` is the first one's parent, as
    vLLM batches a request's blocks; consecutive removes in one tier become one
    ``BlockRemoved``. ``tokens_of(sequence_hash)`` gives a block's tokens when known; the batch
    carries token ids only when every block's are known. Tiers not in ``tiers`` are left out
    (G1 by default: vLLM publishes its own).
    """
    out: list[KvEvent] = []
    run: list[TierEvent] = []

    def flush() -> None:
        if not run:
            return
        first = run[0]
        medium = TIER_MEDIUM.get(first.tier, first.tier)
        hashes = tuple(e.sequence_hash for e in run)
        if isinstance(first, RemoveEvent):
            out.append(BlockRemoved(hashes, medium))
        else:
            tokens: list[int] = []
            for h in hashes:
                got = tokens_of(h) if tokens_of is not None else None
                if got is None or len(got) != block_size:
                    tokens = []
                    break
                tokens.extend(got)
            out.append(
                BlockStored(hashes, first.parent_sequence_hash, tuple(tokens), block_size, medium)
            )
        run.clear()

    for ev in tier_events:
        if ev.tier not in tiers:
            continue
        if run:
            last = run[-1]
            same_kind = type(last) is type(ev) and last.tier == ev.tier
            chained = (
                not isinstance(ev, StoreEvent) or ev.parent_sequence_hash == last.sequence_hash
            )
            if not (same_kind and chained):
                flush()
        run.append(ev)
    flush()
    return out
