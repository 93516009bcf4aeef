"""The connector's worker half on real KV tensors shaped like vLLM 0.32's CPU backend.

No engine: the test plays the model runner (bind, start_load_kv, wait_for_layer_load,
wait_for_save, get_finished) and checks every byte that comes back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.config import KvTierConfig, ModelConfig
from kvtier.executor.jobs import DiskWrite, LoadJob, StepPlan, StoreBatch, WorkerReport
from kvtier.settings import load_settings
from kvtier.storage.host import HostStorage
from kvtier.transfer.copy_api import CopyFuture, CopyHandle
from kvtier.vllm.worker import KvTierWorker, WorkerConfig

MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=32, dtype="float32")
NAMES = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def kv_caches(num_blocks: int = 8) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    shape = (num_blocks, 2, 16, 64)  # [blocks, kv heads, tokens, 2 * head dim]
    return {n: torch.randn(shape, generator=gen) for n in NAMES}


def run_step(w: KvTierWorker, plan: StepPlan) -> tuple[set[str] | None, set[str] | None]:
    w.bind(plan)
    w.start_load_kv()
    for n in NAMES:
        w.wait_for_layer_load(n)
    w.wait_for_save()
    out = w.get_finished()
    w.clear()
    return out


def settle(w: KvTierWorker) -> WorkerReport:
    """Empty steps until nothing is in flight; the merged report."""
    merged = WorkerReport(rank=0)
    for step in range(1000, 2000):
        run_step(w, StepPlan(step, idle=True))
        r = w.take_report()
        if r is not None:
            merged.disk_stored += r.disk_stored
            merged.disk_store_failed += r.disk_store_failed
            merged.loads_done += r.loads_done
            merged.disk_bad += r.disk_bad
        if w.num_inflight == 0:
            return merged
        time.sleep(0.002)
    raise TimeoutError


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[KvTierWorker, dict[str, torch.Tensor]]]:
    kv = kv_caches()
    w = KvTierWorker(WorkerConfig(rank=0, host_blocks=4, disk_blocks=8, disk_dir=str(tmp_path)))
    w.register_kv_caches(kv, MODEL)
    first = w.take_report()
    assert first is not None and first.disk_folder is not None
    assert first == WorkerReport(rank=0, restored=[], disk_folder=first.disk_folder)
    assert Path(first.disk_folder).parent == tmp_path  # G3's namespace folder, for the scheduler
    yield w, kv
    w.close()


def block(kv: dict[str, torch.Tensor], b: int) -> list[torch.Tensor]:
    return [kv[n][b].clone() for n in NAMES]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_store_to_g2_and_g3_then_onboard_bit_exact(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]],
) -> None:
    w, kv = worker
    originals = {b: block(kv, b) for b in (1, 2, 3)}
    plan = StepPlan(
        0,
        stores=StoreBatch([1, 2], [0, 3], [0xA1, 0xA2]),
        disk_writes=[DiskWrite(0xA1, None, host_slot=0), DiskWrite(0xA3, 0xA2, gpu_block=3)],
    )
    run_step(w, plan)
    report = w.take_report()
    assert report is not None and report.host_stored == [0xA1, 0xA2]
    assert report.stores_read_step == 0
    # G3 writes finish on I/O threads: in this step's report or a later one
    assert sorted(report.disk_stored + settle(w).disk_stored) == [0xA1, 0xA3]
    for b in (1, 2, 3, 5, 6, 7):
        for n in NAMES:
            kv[n][b].zero_()
    # layer-wise: one G2 block and two G3 blocks, inside the step
    load = LoadJob(7, "r", False, [3], [5], [0xA1, 0xA3], [6, 7])
    assert run_step(w, StepPlan(1, loads=[load])) == (None, None)
    assert same(block(kv, 5), originals[2])
    assert same(block(kv, 6), originals[1])
    assert same(block(kv, 7), originals[3])
    assert w.take_load_errors() == set()
    assert w.take_report() == WorkerReport(rank=0, loads_done=[7], stores_read_step=1)


def test_async_load_reported_by_get_finished(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]],
) -> None:
    w, kv = worker
    original = block(kv, 2)
    run_step(w, StepPlan(0, stores=StoreBatch([2], [1], [0xB2])))
    w.take_report()
    load = LoadJob(3, "req-9", True, [1], [6], [], [])
    finished: set[str] = set()
    _, recving = run_step(w, StepPlan(1, loads=[load]))
    finished |= recving or set()
    for step in range(2, 200):
        if finished:
            break
        time.sleep(0.002)
        finished |= run_step(w, StepPlan(step, idle=True))[1] or set()
    assert finished == {"req-9"}
    assert same(block(kv, 6), original)


def test_corrupt_g3_block_is_a_load_error_and_never_copied(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    w, kv = worker
    run_step(w, StepPlan(0, disk_writes=[DiskWrite(0xC1, None, gpu_block=1)]))
    run_step(w, StepPlan(1, disk_writes=[DiskWrite(0xC2, 0xC1, gpu_block=2)]))
    assert sorted(settle(w).disk_stored) == [0xC1, 0xC2]
    (path,) = tmp_path.glob(f"*/{0xC2:016x}.kvb")
    data = bytearray(path.read_bytes())
    data[4096 + 7] ^= 0x01
    path.write_bytes(bytes(data))
    for n in NAMES:
        kv[n][5].fill_(1.0)
        kv[n][6].fill_(2.0)
    expected = block(kv, 1)
    load = LoadJob(4, "r", False, [], [], [0xC1, 0xC2], [5, 6])
    run_step(w, StepPlan(5, loads=[load], stores=StoreBatch([3], [0], [0xC3])))
    assert w.take_load_errors() == {6}
    assert same(block(kv, 5), expected)
    assert all(torch.all(kv[n][6] == 2.0) for n in NAMES)  # untouched, vLLM recomputes it
    report = w.take_report()
    assert report is not None
    assert (report.disk_bad, report.load_failed_blocks, report.loads_done) == ([0xC2], 1, [4])
    assert (report.host_load_failed, report.disk_load_failed) == (0, 1)  # the tier that failed
    # a failed layer-wise load drops the step's stores (they may have read the bad block)
    assert report.host_store_failed == [0xC3] and report.host_stored == []
    assert not path.exists()


def test_failed_g2_load_is_reported_as_a_g2_load_error(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A G2 -> G1 copy that fails (injected at the copy engine; G3 loads copy through the same
    engine from their staging rows and are left alone) is counted as a G2 load error."""
    w, kv = worker
    run_step(w, StepPlan(0, stores=StoreBatch([2], [1], [0xB2])))
    run_step(w, StepPlan(1, disk_writes=[DiskWrite(0xC1, None, gpu_block=1)]))
    assert settle(w).disk_stored == [0xC1]
    w.take_report()
    engine = w.plane.engine
    assert engine is not None
    real = engine.host_to_device

    def failing(host: HostStorage, *args: Any, **kw: Any) -> CopyHandle:
        if host is not w.plane.host:
            return real(host, *args, **kw)
        fut = CopyFuture(MODEL.num_layers)
        fut.fail(RuntimeError("injected G2 copy failure"))
        return fut

    monkeypatch.setattr(engine, "host_to_device", failing)
    expected = block(kv, 1)
    load = LoadJob(5, "r", False, [1], [4], [0xC1], [5])
    run_step(w, StepPlan(2, loads=[load]))
    assert w.take_load_errors() == {4}
    assert same(block(kv, 5), expected)
    report = w.take_report()
    assert report is not None
    assert (report.host_load_failed, report.disk_load_failed, report.loads_done) == (1, 0, [5])


def test_restart_reports_the_g3_index(tmp_path: Path) -> None:
    kv = kv_caches()
    w = KvTierWorker(WorkerConfig(rank=0, host_blocks=0, disk_blocks=4, disk_dir=str(tmp_path)))
    w.register_kv_caches(kv, MODEL)
    w.take_report()
    run_step(w, StepPlan(0, disk_writes=[DiskWrite(0xD1, 0xD0, gpu_block=0)]))
    w.close()
    w2 = KvTierWorker(WorkerConfig(rank=0, host_blocks=0, disk_blocks=4, disk_dir=str(tmp_path)))
    w2.register_kv_caches(kv_caches(), MODEL)
    try:
        # the parent hash comes from the block file's header
        got = w2.take_report()
        assert got is not None
        assert got == WorkerReport(
            rank=0, restored=[0xD1], restored_parents=[0xD0], disk_folder=got.disk_folder
        )
    finally:
        w2.close()


def test_worker_config_is_derived_from_the_root(tmp_path: Path) -> None:
    knobs = {"cpu_cache_blocks": 4, "disk_cache_blocks": 8, "disk_dir": str(tmp_path)}
    knobs |= {"disk_o_direct": False, "io_threads": 2, "disk_group": "kv"}
    cfg = KvTierConfig.from_settings(load_settings(knobs, {}), MODEL, num_workers=2, rank=1)
    assert WorkerConfig.from_config(cfg) == WorkerConfig(
        rank=1,
        host_blocks=4,
        disk_blocks=8,
        disk_dir=str(tmp_path / "rank1"),
        disk_o_direct=False,
        io_threads=2,
        disk_group="kv",
    )


def test_constructor_has_no_side_effects(tmp_path: Path) -> None:
    disk = tmp_path / "not-yet"
    KvTierWorker(WorkerConfig(rank=0, host_blocks=4, disk_blocks=4, disk_dir=str(disk)))
    assert not disk.exists()
    with pytest.raises(ValueError, match="disk_dir"):
        WorkerConfig(rank=0, host_blocks=0, disk_blocks=1, disk_dir=None)
