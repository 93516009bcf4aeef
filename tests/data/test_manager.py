"""KvBlockManager end to end on CPU: every path, every layout, byte for byte; faults; close."""

from __future__ import annotations

import dataclasses
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dataplane_helpers import LAYOUT_KINDS, MODEL, engine_tensors, random_rows

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig
from kvtier.core.registry import RemoveEvent, StoreEvent
from kvtier.manager import KvHandle, PathCounters, TierHits
from kvtier.storage.block_file import HEADER_SIZE

BB = MODEL.block_bytes
H = [0x1000 + i for i in range(16)]  # a chain of sequence hashes


def _manager(tmp_path: Path | None, kind: str = "block_first", **kw: object) -> KvBlockManager:
    fields = {"model": MODEL, **kw}
    if tmp_path is not None and "disk_blocks" in kw:
        fields["disk_dir"] = str(tmp_path / "g3")
    cfg = KvTierConfig(**fields)  # type: ignore[arg-type]
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors(kind, MODEL, 8, seed=11))
    mgr.start()
    return mgr


@pytest.fixture
def managers() -> Iterator[list[KvBlockManager]]:
    made: list[KvBlockManager] = []
    yield made
    for m in made:
        m.close()


def _fill(mgr: KvBlockManager, ids: list[int], seed: int) -> list[torch.Tensor]:
    assert mgr.device_pool is not None
    rows = random_rows(len(ids), BB, seed)
    for i, r in zip(ids, rows, strict=True):
        mgr.device_pool.storage.write_block(i, r)
    return rows


def _read(mgr: KvBlockManager, i: int) -> torch.Tensor:
    assert mgr.device_pool is not None
    return mgr.device_pool.storage.read_block(i)


def _scrub(mgr: KvBlockManager) -> None:
    for i in range(8):
        mgr.device_pool.storage.write_block(i, torch.zeros(BB, dtype=torch.uint8))  # type: ignore[union-attr]


def _check(mgr: KvBlockManager) -> None:
    for tier in (mgr.device_pool, mgr.host_pool, mgr.disk_pool):
        if tier is not None:
            tier.pool.check_invariants()


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_device_host_device(kind: str, managers: list[KvBlockManager]) -> None:
    mgr = _manager(None, kind, host_blocks=6)
    managers.append(mgr)
    rows = _fill(mgr, [0, 1, 2, 3], seed=1)
    off = mgr.offload([0, 1, 2, 3], H[:4])
    mgr.wait(off, timeout=10)
    assert off.ok and off.skipped == ()
    assert [mgr.host_pool.pool.contains(h) for h in H[:5]] == [True] * 4 + [False]  # type: ignore[union-attr]
    _scrub(mgr)
    match = mgr.match(H[:6])
    assert (match.num_host, match.num_disk) == (4, 0)
    on = mgr.onboard(match, [7, 5, 6, 4])
    assert all(on.wait_layer(layer, timeout=10) for layer in range(3))
    mgr.wait(on, timeout=10)
    assert on.ok
    for dev, row in zip([7, 5, 6, 4], rows, strict=True):
        assert torch.equal(_read(mgr, dev), row)
    assert torch.equal(_read(mgr, 0), torch.zeros(BB, dtype=torch.uint8))
    st = mgr.stats()
    assert st.paths["device_to_host"] == PathCounters(
        4, 4 * BB, st.paths["device_to_host"].seconds, 0
    )
    assert st.paths["host_to_device"].blocks == 4 and st.paths["host_to_device"].bytes == 4 * BB
    assert st.host == TierHits(hits=4, misses=2)
    events = mgr.drain_events()
    assert [(type(e), e.tier, e.sequence_hash) for e in events] == [
        (StoreEvent, "G2", h) for h in H[:4]
    ]
    assert [e.parent_sequence_hash for e in events if isinstance(e, StoreEvent)] == [None, *H[:3]]
    _check(mgr)
    assert mgr.host_pool.pool.num_inactive == 4  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", LAYOUT_KINDS)
def test_device_disk_device_without_host(
    kind: str, tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    mgr = _manager(tmp_path, kind, disk_blocks=8, staging_blocks=2)
    managers.append(mgr)
    rows = _fill(mgr, [2, 3, 4], seed=2)
    off = mgr.offload([2, 3, 4], H[:3], priority=5)  # 3 blocks > 2 staging rows: own buffer
    mgr.wait(off, timeout=10)
    assert off.ok
    assert mgr.stats().paths["device_to_disk"].blocks == 3
    files = sorted(p.name for p in (tmp_path / "g3").rglob("*.kvb"))
    assert files == sorted(f"{h:016x}.kvb" for h in H[:3])
    _scrub(mgr)
    match = mgr.match(H[:3])
    assert (match.num_host, match.num_disk) == (0, 3)
    on = mgr.onboard(match, [0, 1, 5])
    mgr.wait(on, timeout=10)
    assert on.ok
    for dev, row in zip([0, 1, 5], rows, strict=True):
        assert torch.equal(_read(mgr, dev), row)
    assert mgr.stats().disk == TierHits(hits=3, misses=0)
    _check(mgr)


def test_cascade_and_cross_tier_prefix(tmp_path: Path, managers: list[KvBlockManager]) -> None:
    mgr = _manager(tmp_path, host_blocks=4, disk_blocks=16, disk_filter=False)
    managers.append(mgr)
    a = _fill(mgr, [0, 1, 2, 3], seed=3)
    mgr.wait(mgr.offload([0, 1, 2, 3], H[:4]), timeout=10)
    mgr.wait_all(timeout=10)  # the G2 -> G3 cascade
    assert all(mgr.disk_pool.pool.contains(h) for h in H[:4])  # type: ignore[union-attr]
    assert mgr.stats().paths["host_to_disk"].blocks == 4
    b_hashes = [0x2000, 0x2001]
    _fill(mgr, [4, 5], seed=4)
    mgr.wait(mgr.offload([4, 5], b_hashes), timeout=10)  # evicts the leaves H[3], then H[2]
    host = mgr.host_pool.pool  # type: ignore[union-attr]
    assert [host.contains(h) for h in H[:4]] == [True, True, False, False]
    _scrub(mgr)
    match = mgr.match(H[:5])
    assert (match.num_host, match.num_disk) == (2, 2)
    on = mgr.onboard(match, [6, 7, 0, 1])
    assert len(on.parts) == 2
    mgr.wait(on, timeout=10)
    assert on.ok
    for dev, row in zip([6, 7, 0, 1], a, strict=True):
        assert torch.equal(_read(mgr, dev), row)
    st = mgr.stats()
    assert st.host == TierHits(hits=2, misses=3)
    assert st.disk == TierHits(hits=2, misses=1)
    assert st.paths["disk_to_device"].blocks == 2 and st.paths["host_to_device"].blocks == 2
    mgr.wait_all(timeout=10)
    _check(mgr)


def test_frequency_filter_writes_blocks_seen_twice(
    tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    mgr = _manager(tmp_path, host_blocks=8, disk_blocks=8)
    managers.append(mgr)
    _fill(mgr, [0, 1], seed=5)
    mgr.wait(mgr.offload([0, 1], H[:2]), timeout=10)
    mgr.wait_all(timeout=10)
    assert not mgr.disk_pool.pool.contains(H[0])  # type: ignore[union-attr]
    assert mgr.stats().filter_rejections == 2
    again = mgr.offload([0, 1], H[:2])  # G2 has them: skipped, but a second sighting
    assert again.skipped == tuple(H[:2])
    mgr.wait_all(timeout=10)
    assert all(mgr.disk_pool.pool.contains(h) for h in H[:2])  # type: ignore[union-attr]
    assert mgr.stats().paths["host_to_disk"].blocks == 2
    _fill(mgr, [2], seed=50)
    mgr.wait(mgr.offload([2], [H[2]], parent_sequence_hashes=[H[1]]), timeout=10)
    mgr.wait_all(timeout=10)
    assert not mgr.disk_pool.pool.contains(H[2])  # type: ignore[union-attr]
    mgr.wait(mgr.onboard(mgr.match([H[2]]), [5]), timeout=10)  # reused: second sighting
    mgr.wait_all(timeout=10)
    assert mgr.disk_pool.pool.contains(H[2])  # type: ignore[union-attr]
    _check(mgr)


def test_skips_held_and_no_room(managers: list[KvBlockManager]) -> None:
    mgr = _manager(None, host_blocks=2)
    managers.append(mgr)
    _fill(mgr, [0, 1, 2], seed=6)
    mgr.wait(mgr.offload([0, 1], H[:2]), timeout=10)
    held = mgr.match(H[:2])  # both host blocks in use now
    off = mgr.offload([1, 2], H[1:3], parent_sequence_hashes=H[0:2])
    mgr.wait(off, timeout=10)
    assert off.skipped == (H[1], H[2]) and off.ok and off.block_hashes == ()
    assert mgr.stats().skipped_offloads == 2
    held.release()
    held.release()  # idempotent
    off = mgr.offload([2], [H[2]], parent_sequence_hashes=[H[1]])
    mgr.wait(off, timeout=10)
    assert off.block_hashes == (H[2],)
    _check(mgr)


def _corrupt(mgr: KvBlockManager, h: int) -> None:
    path = mgr.disk_pool.storage.path(h)  # type: ignore[union-attr]
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 7)
        f.write(b"\xff\x00\xff")


def test_corrupt_disk_block_is_reported_never_served(
    tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    mgr = _manager(tmp_path, disk_blocks=8)
    managers.append(mgr)
    rows = _fill(mgr, [0, 1, 2], seed=7)
    mgr.wait(mgr.offload([0, 1, 2], H[:3]), timeout=10)
    _corrupt(mgr, H[1])
    _scrub(mgr)
    on = mgr.onboard(mgr.match(H[:3]), [5, 6, 7])
    mgr.wait(on, timeout=10)
    assert not on.ok
    err = on.error
    assert err is not None
    assert err.failed_hashes == (H[1],) and err.failed_device_block_ids == (6,)
    assert err.corrupt_hashes == (H[1],)
    assert f"{H[1]:016x}" in str(err) and "checksum mismatch" in str(err)
    assert torch.equal(_read(mgr, 5), rows[0]) and torch.equal(_read(mgr, 7), rows[2])
    assert torch.equal(_read(mgr, 6), torch.zeros(BB, dtype=torch.uint8))
    disk = mgr.disk_pool.pool  # type: ignore[union-attr]
    assert not disk.contains(H[1]) and disk.contains(H[0]) and disk.contains(H[2])
    assert mgr.stats().paths["disk_to_device"] == PathCounters(
        2, 2 * BB, mgr.stats().paths["disk_to_device"].seconds, 1
    )
    assert any(isinstance(e, RemoveEvent) and e.sequence_hash == H[1] for e in mgr.drain_events())
    assert mgr.match(H[:3]).num_disk == 1  # prefix now stops at the removed block
    _check(mgr)


def test_failed_disk_write_leaves_pool_as_it_was(
    tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    mgr = _manager(tmp_path, disk_blocks=8)
    managers.append(mgr)
    rows = _fill(mgr, [0, 1, 2], seed=8)
    mgr.wait(mgr.offload([0], H[:1]), timeout=10)
    disk = mgr.disk_pool.pool  # type: ignore[union-attr]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))  # a block file is 12 KiB
    try:
        off = mgr.offload([1, 2], H[1:3])
        mgr.wait(off, timeout=10)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    err = off.error
    assert err is not None and set(err.failed_hashes) == {H[1], H[2]}
    assert "file size limit exceeded" in str(err)
    assert disk.num_registered == 1 and disk.num_free == 7
    assert not list((tmp_path / "g3").rglob("*.tmp"))
    _scrub(mgr)
    on = mgr.onboard(mgr.match(H[:3]), [4])
    mgr.wait(on, timeout=10)
    assert on.ok and torch.equal(_read(mgr, 4), rows[0])
    _check(mgr)


def test_full_tmpfs_via_manager(small_tmpfs: Path, managers: list[KvBlockManager]) -> None:
    cfg = KvTierConfig(model=MODEL, disk_blocks=8, disk_dir=str(small_tmpfs))
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("outer_first", MODEL, 8, seed=1))
    mgr.start()
    managers.append(mgr)
    rows = _fill(mgr, list(range(8)), seed=9)
    off = mgr.offload(list(range(8)), H[:8])
    mgr.wait(off, timeout=10)
    err = off.error
    assert err is not None and "No space left on device" in str(err)
    disk = mgr.disk_pool.pool  # type: ignore[union-attr]
    stored = [i for i, h in enumerate(H[:8]) if disk.contains(h)]
    assert 2 <= len(stored) < 8 and disk.num_registered == len(stored)
    assert not list(small_tmpfs.rglob("*.tmp"))
    _scrub(mgr)
    for i in stored:
        on = mgr.onboard(
            mgr.match([H[i]]),
            [0],
        )
        mgr.wait(on, timeout=10)
        assert on.ok and torch.equal(_read(mgr, 0), rows[i])
    _check(mgr)


def test_layerwise_onboard_waits_for_gate(managers: list[KvBlockManager]) -> None:
    mgr = _manager(None, host_blocks=4)
    managers.append(mgr)
    rows = _fill(mgr, [0, 1], seed=10)
    mgr.wait(mgr.offload([0, 1], H[:2]), timeout=10)
    gate = threading.Event()
    on = mgr.onboard(mgr.match(H[:2]), [3, 2], gate=gate)
    with pytest.raises(TimeoutError):
        on.wait_layer(0, timeout=0.05)
    landed: list[bool] = []
    waiter = threading.Thread(target=lambda: landed.append(on.wait_layer(2, timeout=10)))
    waiter.start()
    gate.set()
    waiter.join(10)
    assert landed == [True]
    mgr.wait(on, timeout=10)
    assert torch.equal(_read(mgr, 3), rows[0]) and torch.equal(_read(mgr, 2), rows[1])


def test_offload_gate_orders_the_read(managers: list[KvBlockManager]) -> None:
    mgr = _manager(None, host_blocks=4)
    managers.append(mgr)
    _fill(mgr, [0], seed=12)
    gate = threading.Event()
    off = mgr.offload([0], H[:1], gate=gate)
    final = _fill(mgr, [0], seed=13)[0]  # the "forward pass" writes after submit, before gate
    gate.set()
    mgr.wait(off, timeout=10)
    _scrub(mgr)
    mgr.wait(mgr.onboard(mgr.match(H[:1]), [1]), timeout=10)
    assert torch.equal(_read(mgr, 1), final)


def test_close_cancels_and_releases(tmp_path: Path) -> None:
    mgr = _manager(tmp_path, host_blocks=4, disk_blocks=4, disk_filter=False)
    _fill(mgr, [0, 1], seed=14)
    gate = threading.Event()
    stuck = mgr.offload([0, 1], H[:2], gate=gate)
    assert isinstance(stuck, KvHandle) and not stuck.done()
    mgr.close(timeout=0.2)
    gate.set()
    assert stuck.done() and stuck.error is not None
    assert mgr.host_pool.pool.num_free == 4  # type: ignore[union-attr]
    mgr.host_pool.pool.check_invariants()  # type: ignore[union-attr]
    assert not list((tmp_path / "g3").rglob("*.tmp"))
    with pytest.raises(RuntimeError, match="not running"):
        mgr.match(H[:1])
    mgr.close()  # idempotent


def test_bad_input(tmp_path: Path, managers: list[KvBlockManager]) -> None:
    cfg = KvTierConfig(model=MODEL, host_blocks=2)
    idle = KvBlockManager(cfg)
    with pytest.raises(RuntimeError, match="not running"):
        idle.offload([0], [1])
    with pytest.raises(RuntimeError, match="no device KV"):
        idle.start()
    with pytest.raises(TypeError, match="must be a KvTierConfig"):
        KvBlockManager(dataclasses.asdict(cfg))  # type: ignore[arg-type]
    mgr = _manager(None, host_blocks=2)
    managers.append(mgr)
    with pytest.raises(ValueError, match="2 device block ids for 1 sequence hashes"):
        mgr.offload([0, 1], [5])
    with pytest.raises(ValueError, match="device block id 8 out of range"):
        mgr.offload([8], [5])
    with pytest.raises(ValueError, match="must be distinct"):
        mgr.offload([0, 1], [5, 5])
    with pytest.raises(RuntimeError, match="before start"):
        mgr.register_device_kv(engine_tensors("block_first", MODEL, 8))
    _fill(mgr, [0], seed=1)
    mgr.wait(mgr.offload([0], [5]), timeout=10)
    match = mgr.match([5])
    with pytest.raises(ValueError, match="2 device blocks for a match of 1 blocks"):
        mgr.onboard(match, [0, 1])
    mgr.wait(mgr.onboard(match, [1]), timeout=10)
    with pytest.raises(ValueError, match="already released or onboarded"):
        mgr.onboard(match, [1])
    with pytest.raises(RuntimeError, match="needs a host or disk tier"):
        _manager(None).offload([0], [1])
    _check(mgr)


def test_own_device_allocation(managers: list[KvBlockManager]) -> None:
    cfg = KvTierConfig(model=MODEL, device_blocks=4, host_blocks=2, device_layout="outer_first")
    mgr = KvBlockManager(cfg)
    with pytest.raises(RuntimeError, match="no device KV yet"):
        _ = mgr.layout
    mgr.start()
    managers.append(mgr)
    assert mgr.layout.num_blocks == 4 and mgr.layout.kind.value == "outer_first"
    rows = _fill_n(mgr, 4)
    mgr.wait(mgr.offload([3], [9]), timeout=10)
    mgr.wait(mgr.onboard(mgr.match([9]), [0]), timeout=10)
    assert torch.equal(_read(mgr, 0), rows[3])


def _fill_n(mgr: KvBlockManager, n: int) -> list[torch.Tensor]:
    return _fill(mgr, list(range(n)), seed=20)


def test_disk_onboard_in_chunks_with_a_corrupt_block(
    tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    """8 blocks from disk are copied in chunks of 4 as reads finish; one corrupt block fails
    alone; the others land bit-exact (layer waits report them) and the error names it."""
    mgr = _manager(tmp_path, "outer_first", disk_blocks=16, staging_blocks=8)
    managers.append(mgr)
    rows = _fill(mgr, list(range(8)), seed=30)
    mgr.wait(mgr.offload(list(range(8)), H[:8]), timeout=10)
    _corrupt(mgr, H[5])
    _scrub(mgr)
    targets = [7, 6, 5, 4, 3, 2, 1, 0]
    on = mgr.onboard(mgr.match(H[:8]), targets)
    assert all(on.wait_layer(layer, timeout=10) for layer in range(3))
    mgr.wait(on, timeout=10)
    assert on.error is not None and on.error.failed_device_block_ids == (2,)
    assert len(on.parts[0]._data.copies) == 2  # type: ignore[union-attr]
    for i, dev in enumerate(targets):
        want = torch.zeros(BB, dtype=torch.uint8) if i == 5 else rows[i]
        assert torch.equal(_read(mgr, dev), want), i
    _check(mgr)


def test_metrics_receive_transfers_lookups_and_occupancy(managers: list[KvBlockManager]) -> None:
    from kvtier.ops.metrics import KvTierMetrics

    metrics = KvTierMetrics()
    cfg = KvTierConfig(model=MODEL, host_blocks=4)
    mgr = KvBlockManager(cfg, metrics=metrics)
    mgr.register_device_kv(engine_tensors("block_first", MODEL, 8))
    mgr.start()
    managers.append(mgr)
    mgr.wait(mgr.offload([0, 1, 2], H[:3]), timeout=10)
    mgr.wait(mgr.onboard(mgr.match(H[:5]), [4, 5]), timeout=10)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("kvtier_blocks_total", path="device_to_host") == 3
    assert value("kvtier_bytes_total", path="device_to_host") == 3 * BB
    assert value("kvtier_blocks_total", path="host_to_device") == 2
    assert value("kvtier_lookup_tokens_total") == 5 * MODEL.block_size
    assert value("kvtier_matched_tokens_total", tier="host") == 3 * MODEL.block_size
    assert value("kvtier_pool_blocks", tier="host", state="inactive") == 3
    assert value("kvtier_pool_blocks", tier="host", state="free") == 1


def test_read_only_disk_serves_what_it_has(tmp_path: Path, managers: list[KvBlockManager]) -> None:
    import os
    import subprocess

    mgr = _manager(tmp_path, disk_blocks=8)
    rows = _fill(mgr, [0], seed=40)
    mgr.wait(mgr.offload([0], H[:1]), timeout=10)
    mgr.close()
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(
            ["mount", "--bind", "-o", "ro", str(tmp_path / "g3"), str(ro)], check=False
        ).returncode:
            pytest.skip("read-only bind mount failed")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=False)
    else:
        os.rename(tmp_path / "g3", ro / "g3")
        ro = ro / "g3"
        for p in [ro, *ro.iterdir()]:
            os.chmod(p, 0o555)
    try:
        cfg = KvTierConfig(model=MODEL, disk_blocks=8, disk_dir=str(ro))
        reader = KvBlockManager(cfg)
        reader.register_device_kv(engine_tensors("block_first", MODEL, 8, seed=11))
        reader.start()
        managers.append(reader)
        on = reader.onboard(reader.match(H[:1]), [3])
        reader.wait(on, timeout=10)
        assert on.ok and torch.equal(_read(reader, 3), rows[0])
        off = reader.offload([1], [H[1]])
        reader.wait(off, timeout=10)
        assert off.error is not None and "is not writable" in str(off.error)
        assert reader.disk_pool.pool.num_registered == 1  # type: ignore[union-attr]
        reader.close()
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)


def test_another_model_does_not_see_or_touch_the_blocks(
    tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    mgr = _manager(tmp_path, disk_blocks=8)
    _fill(mgr, [0, 1], seed=41)
    mgr.wait(mgr.offload([0, 1], H[:2]), timeout=10)
    mgr.close()
    other_model = dataclasses.replace(MODEL, dtype="float16")
    cfg = KvTierConfig(model=other_model, disk_blocks=8, disk_dir=str(tmp_path / "g3"))
    other = KvBlockManager(cfg)
    other.register_device_kv(engine_tensors("block_first", other_model, 8))
    other.start()
    managers.append(other)
    assert len(other.match(H[:2])) == 0
    assert other.stats().disk == TierHits(hits=0, misses=2)
    other.close()
    again = _manager(tmp_path, disk_blocks=8)
    managers.append(again)
    assert again.match(H[:2]).num_disk == 2


@pytest.mark.parametrize("disk", [False, True])
def test_bad_hashes_or_priority_are_refused_at_offload(
    disk: bool, tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    """What ``register`` would refuse when the copy lands is refused by ``offload`` itself:
    nothing is allocated or copied, and a later ``poll`` never raises for it."""
    tiers = {"disk_blocks": 4} if disk else {"host_blocks": 4}
    mgr = _manager(tmp_path, **tiers)  # type: ignore[arg-type]
    managers.append(mgr)
    target = mgr.disk_pool if disk else mgr.host_pool
    assert target is not None
    _fill(mgr, [0, 1], seed=3)
    with pytest.raises(ValueError, match="sequence_hash must be an int in the u64 range"):
        mgr.offload([0], [2**64])
    with pytest.raises(ValueError, match="priority must fit in 64 bits"):
        mgr.offload([0], [5], priority=2**63)
    with pytest.raises(TypeError, match="priority must be an int"):
        mgr.offload([0], [5], priority=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parent_sequence_hash must be an int in the u64 range"):
        mgr.offload([0], [5], parent_sequence_hashes=[-1])
    with pytest.raises(ValueError, match="block 5 cannot be its own parent"):
        mgr.offload([0, 1], [4, 5], parent_sequence_hashes=[None, 5])
    assert target.pool.num_free == 4 and mgr.transfers.pending() == 0
    good = mgr.offload([0, 1], [4, 5])
    mgr.wait(good, timeout=10)
    assert good.ok and target.pool.contains(4) and target.pool.contains(5)
    _check(mgr)


def test_priority_beyond_the_block_file_is_refused_with_a_disk_tier(
    tmp_path: Path, managers: list[KvBlockManager]
) -> None:
    """A block file stores priority in 32 bits: with G3 configured (direct, or through the
    G2 -> G3 cascade) a larger one is refused at offload, not failed at every disk write."""
    mgr = _manager(tmp_path, host_blocks=4, disk_blocks=4, disk_filter=False)
    managers.append(mgr)
    _fill(mgr, [0], seed=4)
    with pytest.raises(ValueError, match="priority must fit in 32 bits with a disk tier"):
        mgr.offload([0], [5], priority=2**31)
    assert mgr.transfers.pending() == 0 and mgr.host_pool.pool.num_free == 4  # type: ignore[union-attr]
    ok = mgr.offload([0], [5], priority=2**31 - 1)
    mgr.wait(ok, timeout=10)
    mgr.wait_all(timeout=10)
    assert ok.ok and mgr.disk_pool.pool.contains(5)  # type: ignore[union-attr]
    host_only = _manager(None, host_blocks=2)
    managers.append(host_only)
    host_only.wait(host_only.offload([0], [5], priority=2**62), timeout=10)
    assert host_only.host_pool.pool.contains(5)  # type: ignore[union-attr]
