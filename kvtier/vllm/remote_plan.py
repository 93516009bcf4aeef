"""G4 (remote tier) on the scheduler side: the ``RemotePlanner`` that looks blocks up in G4
without stretching a step (the plain-data G4 parts of plans and reports: ``kvtier.executor.jobs``).

Why this exists: the prefix walk of a request continues in G4 where G2 and G3 stopped, and the
scheduler half must answer vLLM (``get_num_new_matched_tokens``) inside a step. The lookup is
I/O, not tensors, so it runs here, in the scheduler's process: one batched EXISTS per request (all
ranks' keys of the blocks past the local hit, one pipeline per shard), on a helper thread. The
step waits for it at most what is left of its G4 budget (``remote_timeout_ms`` per step, all
requests together); a lookup that has not answered by then makes vLLM ask again next step
(``None``), and one that has not answered within its own deadline is a miss. With the circuit
breaker open there is no I/O at all: G4 misses, G2 and G3 serve as before.

The key namespace (model identity, layout fingerprint, rank) is known only where the KV tensors
are, so each worker sends its namespace in its first ``RemoteReport``; until every rank has, G4
answers None (ask again), as G3 does before its index is known. Writes to G4 (write-behind of
blocks registered in G2) are planned here too, so blocks this engine just found in G4 or wrote
already are not written again. No torch.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from kvtier.executor.jobs import FIGURES, RemoteFigures, RemoteReport, RemoteWrites, add_figures
from kvtier.lifecycle import Lifecycle
from kvtier.storage.breaker import BreakerState
from kvtier.storage.remote import RemoteConfig, RemoteError, RemoteStore
from kvtier.storage.remote_block import remote_key

__all__ = ["RemoteCounters", "RemotePlanner"]

logger = logging.getLogger(__name__)

KNOWN_MAX = 1 << 16
"""Hashes remembered as present in G4 (not written again); oldest forgotten first."""


@dataclass
class RemoteCounters(RemoteFigures):
    """Cumulative G4 figures of the scheduler half (blocks unless named otherwise)."""

    lookups: int = 0
    lookup_blocks: int = 0
    hit_blocks: int = 0
    lookup_seconds: float = 0.0
    lookup_timeouts: int = 0
    lookup_errors: int = 0
    written_blocks: int = 0
    worker_breaker: str = BreakerState.CLOSED


@dataclass
class _Lookup:
    start: int
    limit: int
    future: Future[list[bool]]
    deadline: float


class RemotePlanner(Lifecycle):
    """G4 lookups and write planning of the scheduler half (see the module docstring)."""

    def __init__(
        self,
        config: RemoteConfig,
        *,
        num_workers: int = 1,
        store: RemoteStore | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.num_workers = num_workers
        self.store = store or RemoteStore(config)
        self.counters = RemoteCounters()
        self._clock = clock
        self._budget_s = config.timeout_ms / 1000.0
        self._spent_s = 0.0
        self._namespaces: dict[int, str] = {}
        self._lookups: dict[str, _Lookup] = {}
        self._known: OrderedDict[int, None] = OrderedDict()
        self._bad: OrderedDict[int, None] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> RemotePlanner:
        self.store.start()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-g4-lookup")
        return self

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        self.store.close()

    @property
    def ready(self) -> bool:
        """Every rank told its namespace (until then G4 misses)."""
        return len(self._namespaces) == self.num_workers

    @property
    def breaker_state(self) -> str:
        return self.store.breaker.state

    # -- lookups ---------------------------------------------------------------------------------

    def match(self, req_id: str, hashes: Sequence[int], start: int, limit: int) -> int | None:
        """How many blocks ``hashes[start:limit]`` G4 holds as a prefix (all ranks), or None:
        the lookup is still out and within its deadline (vLLM asks again next step)."""
        if limit <= start or self._pool is None:
            return 0
        if not self.ready:
            return None  # the workers' first report (their namespaces) comes with the next step
        for i in range(start, limit):  # a block a fetch just failed on is not matched again
            if hashes[i] in self._bad:
                limit = i
                break
        if limit <= start:
            return 0
        look = self._lookups.get(req_id)
        if look is None or (look.start, look.limit) != (start, limit):
            if self.store.breaker.state == BreakerState.OPEN:
                return 0
            keys = self._keys(hashes[start:limit])
            look = _Lookup(
                start,
                limit,
                self._pool.submit(self._exists, keys),
                self._clock() + self._budget_s,
            )
            self._lookups[req_id] = look
            self.counters.lookups += 1
            self.counters.lookup_blocks += limit - start
        remaining = self._budget_s - self._spent_s
        t0 = self._clock()
        try:
            found = look.future.result(timeout=max(0.0, remaining))
        except FutureTimeout:
            self._spent_s += self._clock() - t0
            # Judged at the start of the wait, so a lookup that was still inside its deadline
            # when this step began waiting is asked again next step (not a miss by a hair).
            if t0 < look.deadline:
                return None
            self.counters.lookup_timeouts += 1
            del self._lookups[req_id]
            return 0
        except RemoteError:
            self._spent_s += self._clock() - t0
            self.counters.lookup_errors += 1
            del self._lookups[req_id]
            return 0
        self._spent_s += self._clock() - t0
        world = self.num_workers
        n = 0
        while n < limit - start and all(found[n * world : (n + 1) * world]):
            n += 1
        for h in hashes[start : start + n]:
            _bounded_add(self._known, h)
        return n

    def forget(self, req_id: str) -> None:
        """The request was allocated or finished: its lookup is no longer needed."""
        self._lookups.pop(req_id, None)

    def end_step(self) -> None:
        """A new step starts with the whole G4 budget."""
        self._spent_s = 0.0

    def _keys(self, hashes: Sequence[int]) -> list[bytes]:
        spaces = [self._namespaces[r] for r in range(self.num_workers)]
        return [remote_key(ns, h) for h in hashes for ns in spaces]

    def _exists(self, keys: list[bytes]) -> list[bool]:
        t0 = time.perf_counter()
        try:
            return self.store.exists(keys)
        finally:
            self.counters.lookup_seconds += time.perf_counter() - t0

    # -- writes ----------------------------------------------------------------------------------

    def plan_writes(
        self, hashes: Sequence[int], parents: Sequence[int | None], host_slots: Sequence[int]
    ) -> RemoteWrites | None:
        """The G2 stores of this step to write behind (those not known to be in G4 already)."""
        # Planned before the namespaces are known too: the workers know their own.
        if self.store.breaker.state == BreakerState.OPEN:
            return None
        out = RemoteWrites()
        for i, h in enumerate(hashes):
            if h in self._known:
                continue
            out.hashes.append(h)
            out.parents.append(parents[i] if parents else None)
            out.host_slots.append(host_slots[i])
        return out if out.hashes else None

    # -- reports ---------------------------------------------------------------------------------

    def on_report(self, rank: int, report: RemoteReport) -> None:
        """Fold one worker's G4 report into the counters; learn its namespace."""
        if report.namespace is not None:
            self._namespaces[rank] = report.namespace
        c = self.counters
        add_figures(c, report, FIGURES)
        c.worker_breaker = report.breaker_state
        if rank == 0:
            c.written_blocks += len(report.written)
        for h in report.written:
            _bounded_add(self._known, h)
            self._bad.pop(h, None)
        for h in report.bad:
            _bounded_add(self._bad, h)
            self._known.pop(h, None)
        if report.fetch_missing or report.fetch_corrupt or report.fetch_failed:
            # G4 lost blocks (eviction, restart): write what we store again.
            self._known.clear()


def _bounded_add(table: OrderedDict[int, None], h: int) -> None:
    table[h] = None
    table.move_to_end(h)
    while len(table) > KNOWN_MAX:
        table.popitem(last=False)
