"""``LoadJobs``: the loads (G2/G3 -> device) in flight, by job id, and the pins they hold.

Why apart: a load's pins live from ``TierPlanner.begin_load`` until every worker reported it (or
it is trimmed), apart from the decisions; ``TierPlanner`` composes this and keeps the counters.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvtier.plan.slots import SlotIndex

__all__ = ["Load", "LoadJobs"]


@dataclass
class Load:
    """One load job: the blocks it reads (its G2 blocks first) and when it was planned."""

    req_id: str
    host_hashes: list[int]
    disk_hashes: list[int]
    since: float
    reports: int = 0


class LoadJobs:
    """The loads in flight over the G2 index ``host`` and the G3 index ``disk``."""

    def __init__(self, host: SlotIndex, disk: SlotIndex, num_workers: int) -> None:
        self._host, self._disk = host, disk
        self._num_workers = num_workers
        self._jobs: dict[int, Load] = {}
        self._next_job = 0

    def __bool__(self) -> bool:
        return bool(self._jobs)

    def begin(
        self, req_id: str, host_hashes: list[int], disk_hashes: list[int], since: float
    ) -> tuple[int, list[int]]:
        """Pin the blocks a load reads; returns its job id and the G2 slots it reads."""
        slots = self._host.pin_all(host_hashes)
        self._disk.pin_all(disk_hashes)
        job_id = self._next_job
        self._next_job += 1
        self._jobs[job_id] = Load(req_id, host_hashes, disk_hashes, since)
        return job_id, slots

    def trim(self, job_id: int, keep: int) -> None:
        """Keep the pins of the first ``keep`` blocks (G2 first); ``keep=0`` drops the job."""
        load = self._jobs[job_id]
        nh = min(keep, len(load.host_hashes))
        nd = min(keep - nh, len(load.disk_hashes))
        self._unpin(load.host_hashes[nh:], load.disk_hashes[nd:])
        del load.host_hashes[nh:], load.disk_hashes[nd:]
        if not keep:
            del self._jobs[job_id]

    def reported(self, job_id: int) -> Load | None:
        """One worker finished load ``job_id``: once all have, its pins go and it is returned."""
        load = self._jobs.get(job_id)
        if load is None:
            return None
        load.reports += 1
        if load.reports < self._num_workers:
            return None
        del self._jobs[job_id]
        self._unpin(load.host_hashes, load.disk_hashes)
        return load

    def count_pins(self, host_pins: dict[int, int], disk_pins: dict[int, int]) -> None:
        """Add the pins the loads hold, per hash, to ``host_pins`` and ``disk_pins``."""
        for load in self._jobs.values():
            for h in load.host_hashes:
                host_pins[h] = host_pins.get(h, 0) + 1
            for h in load.disk_hashes:
                disk_pins[h] = disk_pins.get(h, 0) + 1

    def _unpin(self, host_hashes: list[int], disk_hashes: list[int]) -> None:
        for h in host_hashes:
            self._host.unpin(h)
        for h in disk_hashes:
            self._disk.unpin(h)
