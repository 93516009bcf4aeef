"""What the scheduler half keeps of each request, and the rows of a scheduled step. No torch.

Why apart: ``KvTierScheduler`` is the decisions; this is the per-request state they update.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kvtier.tokens import SequenceHashes


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
