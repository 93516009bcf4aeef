"""The scheduler half's record of each request, and which of its blocks each step stores. No torch.

Why apart from kvtier.vllm.scheduler (vLLM's API, the step plan): a request's hashes, GPU blocks
and store cursor change together, and ``RequestState.plan_stores`` offers each one once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtier.executor.jobs import DiskWrite, StoreBatch
from kvtier.hashing import SequenceHashes
from kvtier.plan.planner import TierPlanner


class RequestLike(Protocol):
    """The attributes of vLLM's ``Request`` the scheduler half reads."""

    request_id: str
    cache_salt: str | None
    lora_request: Any

    @property
    def all_token_ids(self) -> Sequence[int]: ...

    @property
    def num_tokens(self) -> int: ...


@dataclass
class RequestState:
    """A tracked request: its hashes, GPU blocks, what is stored and what the last match found."""

    request: RequestLike
    hashes: SequenceHashes
    block_ids: list[int] = field(default_factory=list)
    next_store: int = 0
    match_start: int = 0
    match_host: int = 0
    match_disk: int = 0
    match_remote: int = 0
    last_store_step: int = -1
    load_job: int | None = None
    query_tokens: int = 0

    def plan_stores(
        self,
        planner: TierPlanner,
        done_tokens: int,
        step: int,
        stores: StoreBatch,
        writes: list[DiskWrite],
        block_tokens: dict[int, tuple[int, ...]] | None,
    ) -> None:
        """Offer the planner the blocks ``done_tokens`` completes that were not offered yet, adding
        its choices to this step's ``stores``/``writes`` (their tokens to ``block_tokens``)."""
        bs = self.hashes.block_size
        done_tokens = min(done_tokens, self.request.num_tokens)
        hashes = self.hashes
        hashes.advance(self.request.all_token_ids, done_tokens)
        complete = min(done_tokens // bs, len(self.block_ids), len(hashes.hashes))
        if self.next_store >= complete:
            return
        all_tokens = self.request.all_token_ids
        for i in range(self.next_store, complete):
            h = hashes.hashes[i]
            parent = hashes.hashes[i - 1] if i else None
            gpu_block = self.block_ids[i]
            got = planner.store(h, parent)
            if got.host_slot is not None:
                stores.gpu_blocks.append(gpu_block)
                stores.host_slots.append(got.host_slot)
                stores.hashes.append(h)
                stores.parents.append(parent)
            if got.in_host:
                self.last_store_step = step
            if got.disk_write:
                if got.disk_host_slot >= 0:
                    writes.append(DiskWrite(h, parent, host_slot=got.disk_host_slot))
                else:
                    writes.append(DiskWrite(h, parent, gpu_block=gpu_block))
                    self.last_store_step = step
            if block_tokens is not None and (got.disk_write or got.host_slot is not None):
                block_tokens[h] = tuple(all_tokens[i * bs : (i + 1) * bs])
        self.next_store = max(self.next_store, complete)


def lora_name(request: RequestLike) -> str | None:
    lora = getattr(request, "lora_request", None)
    if lora is None:
        return None
    name = getattr(lora, "lora_name", None)
    return str(name) if name is not None else None


def scheduled_rows(
    new_reqs: Iterable[tuple[str, Sequence[int], int]],
    cached_reqs: Iterable[tuple[str, Sequence[int] | None, int, bool]],
) -> Iterator[tuple[str, Sequence[int] | None, int, bool, bool]]:
    """Both kinds of scheduled request as (req_id, block_ids, computed, resumed, new)."""
    for req_id, block_ids, computed in new_reqs:
        yield req_id, block_ids, computed, False, True
    for req_id, new_ids, computed, resumed in cached_reqs:
        yield req_id, new_ids, computed, resumed, False
