"""G3 shared by real processes: several managers on one directory at once.

What the disk tier promises to processes sharing a directory: no crash from files appearing,
disappearing or being written by others; a reader gets the whole block or a miss; blocks one
process writes are hits in the others while they run; the capacity bound holds across all of
them (within one block per process); concurrent writers of one block are harmless.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from dataplane_helpers import MODEL, random_rows

from kvtier.storage.disk import DiskStorage

WORKER = Path(__file__).with_name("shared_dir_worker.py")
FP = 0x5EED_0000_0000_0001


def _block_files(root: Path) -> int:
    n = 0
    for ns in root.iterdir():
        if ns.is_dir():
            n += sum(1 for e in os.scandir(ns) if e.name.endswith(".kvb"))
    return n


def test_three_managers_share_one_directory(tmp_path: Path) -> None:
    root = tmp_path / "g3"
    procs, capacity, ops = 3, 40, 1500
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    children = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(root), str(capacity), str(ops), str(7 + i), "150"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(procs)
    ]
    most = 0
    while any(c.poll() is None for c in children):
        if root.exists():
            most = max(most, _block_files(root))
        time.sleep(0.01)
    outs = [c.communicate() for c in children]
    for c, (_out, err) in zip(children, outs, strict=True):
        assert c.returncode == 0, err[-3000:]
    stats = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sum(s["wrong_bytes"] for s in stats) == 0
    assert sum(s["writes"] for s in stats) >= 1000  # thousands of block operations in all
    assert all(s["reopens"] == 3 for s in stats)
    assert all(s["live_foreign_hits"] > 0 for s in stats), stats  # others' blocks, while running
    assert most <= capacity + procs, most  # within one block per process
    assert _block_files(root) <= capacity
    (ns,) = [p for p in root.iterdir() if p.is_dir()]
    assert not list(ns.glob("*.tmp"))  # every writer published or removed its temp file
    assert (ns / ".kvtier-count").exists()


def test_concurrent_writers_of_one_block_are_harmless(tmp_path: Path) -> None:
    nbytes = MODEL.block_bytes
    (row,) = random_rows(1, nbytes, seed=3)
    a = DiskStorage(tmp_path, FP, nbytes, capacity=4)
    b = DiskStorage(tmp_path, FP, nbytes, capacity=4)
    a.open()
    b.open()
    a.write(9, row)
    b.write(9, row)  # the block is there already: b keeps a's copy
    assert sorted(p.name for p in a.directory.glob("*.kvb")) == [f"{9:016x}.kvb"]
    out = torch.zeros(nbytes, dtype=torch.uint8)
    b.read(9, out)
    assert torch.equal(out, row)
    assert a._dir.count() == 1  # counted once
    a.close()
    b.close()


def test_a_block_deleted_by_another_process_is_a_miss(tmp_path: Path) -> None:
    nbytes = MODEL.block_bytes
    (row,) = random_rows(1, nbytes, seed=4)
    a = DiskStorage(tmp_path, FP, nbytes, capacity=4)
    a.open()
    a.write(5, row)
    b = DiskStorage(tmp_path, FP, nbytes, capacity=4)
    assert [s.sequence_hash for s in b.open()] == [5]
    a.remove(5)
    out = torch.zeros(nbytes, dtype=torch.uint8)
    try:
        b.read(5, out)
        raise AssertionError("a deleted block was served")
    except OSError as exc:
        assert not getattr(exc, "corrupt", True) and "cannot open" in str(exc)
    assert not b.has_block(5)
    assert a._dir.count() == 0
    b.remove(5)  # deleting what another process deleted already does not count twice
    assert a._dir.count() == 0
    a.close()
    b.close()


def test_full_tier_makes_room_across_processes(tmp_path: Path) -> None:
    nbytes = MODEL.block_bytes
    rows = random_rows(6, nbytes, seed=5)
    a, b, c = (DiskStorage(tmp_path, FP, nbytes, capacity=3) for _ in range(3))
    for st in (a, b, c):
        st.open()  # all empty: none knows a block yet
    for i in range(3):
        a.write(100 + i, rows[i])
    try:
        c.write(300, rows[5])  # full, and c knows no block it could delete: refused
        raise AssertionError("capacity exceeded")
    except OSError as exc:
        assert "G3 is full (3 of 3 blocks" in str(exc)
    assert b.has_block(100)  # b learns of a's oldest block (e.g. by a hit)
    b.write(200, rows[3])  # the tier is full: b deletes the block it knows of
    assert sorted(int(p.name[:16], 16) for p in a.directory.glob("*.kvb")) == [101, 102, 200]
    assert b.evicted_for_room == 1 and a._dir.count() == 3
    a.write(103, rows[4])  # a makes room too: its oldest known block that still exists
    assert sorted(int(p.name[:16], 16) for p in a.directory.glob("*.kvb")) == [102, 103, 200]
    assert a._dir.count() == 3
    for st in (a, b, c):
        st.close()


def test_a_large_tier_starts_from_names_and_still_bounds_capacity(tmp_path: Path) -> None:
    nbytes = MODEL.block_bytes
    rows = random_rows(4, nbytes, seed=6)
    a = DiskStorage(tmp_path, FP, nbytes, capacity=3)
    a.open()
    for i in range(3):
        a.write(10 + i, rows[i])
    a.close()
    big = DiskStorage(tmp_path, FP, nbytes, capacity=3, scan_headers_up_to=2)
    assert big.open() == [] and big.names_only  # more files than headers it reads at start
    assert big.has_block(11)  # found by name when looked up
    out = torch.zeros(nbytes, dtype=torch.uint8)
    big.read(11, out)  # and verified when read
    assert torch.equal(out, rows[1])
    big.write(20, rows[3])  # full: the oldest name it scanned makes room
    assert len(list(big.directory.glob("*.kvb"))) == 3 and big._dir.count() == 3
    big.close()


_KILLED_WRITER = """
import sys, torch
from kvtier.storage.disk import DiskStorage
st = DiskStorage(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), capacity=10)
st.open()
print("writing", flush=True)
g = torch.Generator().manual_seed(0)
h = 0
while True:  # write until killed; the tier stays full, so every write also evicts
    h += 1
    st.write(h, torch.randint(0, 256, (int(sys.argv[3]),), dtype=torch.uint8, generator=g))
"""


def test_writers_killed_mid_write_leave_a_tier_that_recounts_and_verifies(tmp_path: Path) -> None:
    import signal

    from kvtier.ops.diskscan import fsck_dir

    nbytes = MODEL.block_bytes
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(3):
        writer = subprocess.Popen(
            [sys.executable, "-c", _KILLED_WRITER, str(tmp_path), str(FP), str(nbytes)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        time.sleep(0.3)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    st = DiskStorage(tmp_path, FP, nbytes, capacity=10)
    found = st.open()  # alone: leftovers removed, the count recounted from the files
    files = list(st.directory.glob("*.kvb"))
    assert len(found) == len(files) <= 10 and st._dir.count() == len(files)
    assert not list(st.directory.glob("*.tmp"))
    report = fsck_dir(tmp_path)
    assert report.bad == [] and report.good == len(files)  # no half block was ever published
    st.close()
