"""The connector's worker half on CUDA KV tensors, without vLLM: the test plays the model runner
and checks every byte that comes back through the CUDA data path (``GpuDataPath`` on the rank's
``RankDataPlane``: pinned G2, asynchronous stores, G3 through pinned bounce rows)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cuda_helpers import needs_cuda

from kvtier.config import KvTierConfig, ModelConfig
from kvtier.executor.jobs import (
    DiskWrite,
    LoadJob,
    RemoteLoad,
    RemoteWrites,
    StepPlan,
    StoreBatch,
    WorkerReport,
)
from kvtier.ops.redislocal import LocalRedis, redis_available
from kvtier.storage.remote import RemoteConfig
from kvtier.storage.remote_block import decode_block, encode_block, remote_key
from kvtier.vllm.worker import KvTierWorker, WorkerConfig, attach_remote

pytestmark = needs_cuda

MODEL = ModelConfig(num_layers=2, block_size=16, num_kv_heads=2, head_dim=32, dtype="float32")
NAMES = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


def run_step(w: KvTierWorker, plan: StepPlan) -> tuple[set[str] | None, set[str] | None]:
    w.bind(plan)
    w.start_load_kv()
    for n in NAMES:
        w.wait_for_layer_load(n)
    w.wait_for_save()
    out = w.get_finished()
    w.clear()
    return out


def settle(w: KvTierWorker, first_step: int) -> tuple[WorkerReport, set[str]]:
    """Idle steps until nothing is in flight: the reports merged, the requests reported loaded."""
    merged, recving = WorkerReport(rank=0), set[str]()
    for step in range(first_step, first_step + 5000):
        r = w.take_report()
        if r is not None:
            merged.host_stored += r.host_stored
            merged.host_store_failed += r.host_store_failed
            merged.disk_stored += r.disk_stored
            merged.loads_done += r.loads_done
            merged.disk_bad += r.disk_bad
        if w.num_inflight == 0:
            torch.cuda.synchronize()
            return merged, recving
        recving |= run_step(w, StepPlan(step, idle=True))[1] or set()
        time.sleep(0.002)
    raise TimeoutError


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[KvTierWorker, dict[str, torch.Tensor]]]:
    gen = torch.Generator(device="cuda").manual_seed(1)
    kv = {n: torch.randn((8, 2, 16, 64), generator=gen, device="cuda") for n in NAMES}
    w = KvTierWorker(WorkerConfig(rank=0, host_blocks=4, disk_blocks=8, disk_dir=str(tmp_path)))
    w.register_kv_caches(kv, MODEL)
    assert w._gpu is not None, "the CUDA data path is not in use"
    pinner = w.plane.pinner
    assert pinner is not None and pinner.wait_rows(4, timeout=30.0)
    w.take_report()
    yield w, kv
    w.close()


def block(kv: dict[str, torch.Tensor], b: int) -> list[torch.Tensor]:
    return [kv[n][b].clone() for n in NAMES]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("is_async", [False, True])
def test_store_to_g2_and_g3_then_onboard_bit_exact(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]], is_async: bool
) -> None:
    w, kv = worker
    originals = {b: block(kv, b) for b in (1, 2, 3)}
    plan = StepPlan(
        0,
        stores=StoreBatch([1, 2], [0, 3], [0xA1, 0xA2]),
        disk_writes=[DiskWrite(0xA1, None, host_slot=0), DiskWrite(0xA3, 0xA2, gpu_block=3)],
    )
    run_step(w, plan)
    report, _ = settle(w, 100)
    assert sorted(report.host_stored) == [0xA1, 0xA2] and not report.host_store_failed
    assert sorted(report.disk_stored) == [0xA1, 0xA3]
    for b in (1, 2, 3, 5, 6, 7):
        for n in NAMES:
            kv[n][b].zero_()
    torch.cuda.synchronize()
    load = LoadJob(7, "r", is_async, [3], [5], [0xA1, 0xA3], [6, 7])
    recving = run_step(w, StepPlan(1, loads=[load]))[1] or set()
    report, later = settle(w, 2000)
    assert report.loads_done == [7]
    assert recving | later == ({"r"} if is_async else set())
    assert same(block(kv, 5), originals[2])
    assert same(block(kv, 6), originals[1])
    assert same(block(kv, 7), originals[3])
    assert w.take_load_errors() == set()


def test_corrupt_g3_block_is_a_load_error_and_never_copied(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    w, kv = worker
    run_step(w, StepPlan(0, disk_writes=[DiskWrite(0xC1, None, gpu_block=1)]))
    run_step(w, StepPlan(1, disk_writes=[DiskWrite(0xC2, 0xC1, gpu_block=2)]))
    assert sorted(settle(w, 100)[0].disk_stored) == [0xC1, 0xC2]
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
    report, _ = settle(w, 3000)
    assert w.take_load_errors() == {6}
    assert same(block(kv, 5), expected)
    assert all(torch.all(kv[n][6] == 2.0) for n in NAMES)  # untouched, vLLM recomputes it
    assert report.disk_bad == [0xC2] and report.loads_done == [4]
    # a failed layer-wise load drops the step's stores (they may have read the bad block)
    assert report.host_store_failed == [0xC3] and report.host_stored == []
    assert not path.exists()


@pytest.mark.parametrize("is_async", [False, True])
def test_g4_load_is_fetched_into_the_gpu_and_g2(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]], tmp_path: Path, is_async: bool
) -> None:
    """A G4 hit on the CUDA path lands in its GPU block and its G2 slot, bit-exact; a G4 miss
    is a load error (recomputed), never served."""
    reason = redis_available()
    if reason is not None:
        pytest.skip(reason)
    w, kv = worker
    with LocalRedis() as node:
        cfg = KvTierConfig(
            model=MODEL, host_blocks=4, remote=RemoteConfig(url=node.url, timeout_ms=5000)
        )
        g4 = attach_remote(w, cfg)
        row = w.plane.device.read_block(2)  # canonical bytes, on the host
        value = encode_block(g4.fingerprint, 0xE1, None, row.numpy().tobytes())
        g4.store.put([(remote_key(g4.namespace, 0xE1), value)])
        expected = block(kv, 2)
        for n in NAMES:
            kv[n][6].zero_()
            kv[n][7].fill_(3.0)
        torch.cuda.synchronize()
        fetch = RemoteLoad([0xE1, 0xE2], [6, 7], [1, -1])  # 0xE2 is not in G4
        load = LoadJob(9, "g4", is_async, remote=fetch)
        recving = run_step(w, StepPlan(1, loads=[load]))[1] or set()
        report, later = settle(w, 4000)
        assert report.loads_done == [9]
        assert recving | later == ({"g4"} if is_async else set())
        assert w.take_load_errors() == {7}
        assert same(block(kv, 6), expected)
        assert all(torch.all(kv[n][7] == 3.0) for n in NAMES)  # untouched, vLLM recomputes it
        host = w.plane.host
        assert host is not None and torch.equal(host.row(1), row)
        assert report.host_stored == [0xE1]


def test_landed_g2_stores_are_written_behind_to_g4(
    worker: tuple[KvTierWorker, dict[str, torch.Tensor]],
) -> None:
    """The CUDA path writes a step's G2 stores to G4 once their copy landed, bit-exact."""
    reason = redis_available()
    if reason is not None:
        pytest.skip(reason)
    w, _ = worker
    with LocalRedis() as node:
        cfg = KvTierConfig(
            model=MODEL, host_blocks=4, remote=RemoteConfig(url=node.url, timeout_ms=5000)
        )
        g4 = attach_remote(w, cfg)
        row = w.plane.device.read_block(1)
        writes = RemoteWrites([0xF1], [0xF0], [2])
        run_step(w, StepPlan(0, stores=StoreBatch([1], [2], [0xF1]), remote_writes=writes))
        report, _ = settle(w, 100)
        assert report.host_stored == [0xF1]
        assert g4.writer.flush(30.0)
        (value,) = g4.store.get([remote_key(g4.namespace, 0xF1)])
        assert value is not None
        header, payload = decode_block(value, g4.fingerprint, 0xF1, row.numel())
        assert header.parent_hash == 0xF0 and bytes(payload) == row.numpy().tobytes()
