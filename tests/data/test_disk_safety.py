"""G3 files and paths: every hostile or odd thing found in a shared directory, one test each.

Owner-only modes (and the shared-group knob), symlinks never followed, FIFOs and folders named
like blocks never opened or waited on, parent links naming themselves or a cycle, lengths
claimed by a header bounded before anything is read, and a read-only tier that says so once.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from dataplane_helpers import MODEL, engine_tensors, random_rows

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig
from kvtier.ops.diskscan import fsck_dir
from kvtier.storage.block_file import BlockHeader, acyclic_parents, file_size
from kvtier.storage.disk import DiskBlockError, DiskStorage
from kvtier.storage.tier_dir import COUNT_FILE, TierDirError

FP = 0x0A11_CE00_0000_0001
NB = MODEL.block_bytes


def _store(root: Path, **kw: object) -> DiskStorage:
    st = DiskStorage(root, FP, NB, **kw)  # type: ignore[arg-type]
    st.open()
    return st


def test_files_and_folders_are_owner_only_under_umask_022(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        st = _store(tmp_path / "g3", capacity=4, identity={"model": "m"})
        (row,) = random_rows(1, NB, seed=1)
        st.write(1, row)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(st.directory).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "g3").st_mode) == 0o700  # created by the tier
    for name in (st.path(1).name, COUNT_FILE, ".kvtier-identity.json"):
        assert stat.S_IMODE(os.stat(st.directory / name).st_mode) == 0o600, name
    st.close()


def test_shared_group_knob_gives_group_read_write(tmp_path: Path) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    old = os.umask(0o022)
    try:
        st = _store(tmp_path, group=group)
        (row,) = random_rows(1, NB, seed=2)
        st.write(1, row)
    finally:
        os.umask(old)
    folder = os.stat(st.directory)
    assert stat.S_IMODE(folder.st_mode) == 0o2770 and folder.st_gid == os.getgid()
    assert stat.S_IMODE(os.stat(st.path(1)).st_mode) == 0o660
    with pytest.raises(TierDirError, match="no such group"):
        DiskStorage(tmp_path, FP + 1, NB, group="no-such-group-kvtier").open()
    st.close()


def test_a_symlinked_namespace_folder_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    victim = target / f"{1:016x}.kvb"
    victim.write_bytes(b"not a block: start-up must not delete it")
    root = tmp_path / "g3"
    root.mkdir()
    (root / f"{FP:016x}").symlink_to(target)
    with pytest.raises(TierDirError, match="symlink"):
        DiskStorage(root, FP, NB).open()
    with pytest.raises(ValueError, match="not a kvtier disk tier"):
        fsck_dir(root, repair=True)  # the symlink is not followed: there is no tier here
    assert victim.exists()


def test_a_symlinked_block_file_is_never_read(tmp_path: Path) -> None:
    st = _store(tmp_path)
    (row,) = random_rows(1, NB, seed=3)
    st.write(1, row)
    os.symlink(st.path(1), st.path(2))
    assert [s.sequence_hash for s in DiskStorage(tmp_path, FP, NB).open()] == [1]
    with pytest.raises(DiskBlockError, match="cannot open") as err:
        st.read(2, torch.zeros(NB, dtype=torch.uint8))
    assert not err.value.corrupt
    st.close()


def test_a_fifo_named_like_a_block_never_blocks(tmp_path: Path) -> None:
    st = _store(tmp_path)
    os.mkfifo(st.path(7))
    script = textwrap.dedent(
        f"""
        import torch
        from kvtier.storage.disk import DiskStorage, DiskBlockError
        from kvtier.ops.diskscan import fsck_dir, inspect_dir
        st = DiskStorage({str(tmp_path)!r}, {FP}, {NB})
        assert st.open() == []
        try:
            st.read(7, torch.zeros({NB}, dtype=torch.uint8))
            raise SystemExit("a FIFO was read as a block")
        except DiskBlockError as exc:
            assert not exc.corrupt, exc
        assert fsck_dir(st.root).checked == 0 and inspect_dir(st.root).other_files == 1
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
    st.close()


def test_a_folder_named_like_a_block_is_ignored(tmp_path: Path) -> None:
    st = _store(tmp_path)
    st.path(8).mkdir()
    again = DiskStorage(tmp_path, FP, NB)
    assert again.open() == []
    with pytest.raises(DiskBlockError):
        again.read(8, torch.zeros(NB, dtype=torch.uint8))
    again.remove(8)  # never removes a folder
    assert st.path(8).is_dir()
    (row,) = random_rows(1, NB, seed=4)
    with pytest.raises(DiskBlockError):
        again.write(8, row)  # the name is taken by a folder: a failed store, not a crash
    st.close()
    again.close()


def _forge(st: DiskStorage, h: int, parent: int | None, row: torch.Tensor) -> None:
    """A valid block file of hash ``h`` whose header names ``parent`` (any value)."""
    st.write(h, row, parent_hash=parent)


def test_self_and_cyclic_parent_links_pin_nothing(tmp_path: Path) -> None:
    assert acyclic_parents([1, 2, 3], {1: 1, 2: 3, 3: 2}) == {1: None, 2: None, 3: 2}
    assert acyclic_parents([5, 6], {5: 99, 6: 5}) == {5: 99, 6: 5}  # absent parent: kept
    disk = str(tmp_path / "g3")
    cfg = KvTierConfig(model=MODEL, disk_blocks=3, disk_dir=disk, disk_filter=False)
    rows = random_rows(6, NB, seed=5)
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("block_first", MODEL, 8, seed=0))
    seed = DiskStorage(disk, mgr.layout.fingerprint, NB)
    seed.open()
    _forge(seed, 0xA, 0xA, rows[0])  # names itself
    _forge(seed, 0xB, 0xC, rows[1])  # B -> C -> B
    _forge(seed, 0xC, 0xB, rows[2])
    seed.close()
    with mgr:
        assert mgr.disk_pool is not None and mgr.device_pool is not None
        assert mgr.disk_pool.pool.num_registered == 3
        mgr.disk_pool.pool.check_invariants()
        for i, h in enumerate((0xD1, 0xD2, 0xD3)):
            mgr.device_pool.storage.write_block(i, rows[3 + i])
            mgr.wait(mgr.offload([i], [h], parent_sequence_hashes=[None]), timeout=30)
        held = {h for h in (0xA, 0xB, 0xC, 0xD1, 0xD2, 0xD3) if mgr.disk_pool.pool.contains(h)}
        assert held == {0xD1, 0xD2, 0xD3}  # every forged block could be evicted
        mgr.disk_pool.pool.check_invariants()


def _sparse_claim(st: DiskStorage, h: int, claimed: int) -> Path:
    """A 4 KiB header claiming a ``claimed``-byte payload, in a sparse file of matching size."""
    path = st.path(h)
    path.write_bytes(BlockHeader(FP, h, None, 0, claimed, 0).pack())
    os.truncate(path, file_size(claimed))
    return path


def test_lengths_a_header_claims_are_bounded_before_reading(tmp_path: Path) -> None:
    st = _store(tmp_path, identity={"model": "m"})  # the identity file states block_bytes
    _sparse_claim(st, 0x51, 1 << 30)
    (bad,) = fsck_dir(tmp_path).bad
    assert "claims a 1073741824-byte payload; blocks here are" in bad.reason
    again = DiskStorage(tmp_path, FP, NB)
    assert again.open() == []  # the engine refuses it from the header alone, and removes it
    assert not st.path(0x51).exists()
    st.close()
    again.close()


def test_fsck_memory_stays_bounded_whatever_the_header_claims(tmp_path: Path) -> None:
    st = _store(tmp_path)  # no identity file: fsck cannot know the block size
    _sparse_claim(st, 0x52, 1 << 30)
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from kvtier.ops.diskscan import fsck_dir
        (bad,) = fsck_dir(Path({str(tmp_path)!r})).bad
        assert "checksum mismatch" in bad.reason, bad.reason
        # VmHWM: this process's own peak; ru_maxrss keeps the forking parent's (pytest's,
        # which is large once vLLM was imported) across exec.
        status = Path("/proc/self/status").read_text().splitlines()
        print(next(int(x.split()[1]) for x in status if x.startswith("VmHWM:")) // 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 400  # MiB; reading it whole took 2.3 GB before
    st.close()


def test_a_read_only_tier_says_so_once_and_serves_reads(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    st = _store(tmp_path / "rw")
    rows = random_rows(3, NB, seed=6)
    st.write(1, rows[0])
    st.close()
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root (root ignores chmod)")
    if subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path / "rw"), str(ro)]).returncode:
        pytest.skip("read-only bind mount failed")
    subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=False)
    try:
        with caplog.at_level(logging.WARNING, logger="kvtier"):
            reader = DiskStorage(ro, FP, NB)
            assert [s.sequence_hash for s in reader.open()] == [1]
            for i in range(2):
                with pytest.raises(DiskBlockError, match="not writable"):
                    reader.write(10 + i, rows[1 + i])
            out = torch.zeros(NB, dtype=torch.uint8)
            reader.read(1, out)
            reader.close()
        assert torch.equal(out, rows[0])
        said = [r for r in caplog.records if "read-only" in r.getMessage()]
        assert len(said) == 1 and len(caplog.records) == 1
    finally:
        subprocess.run(["umount", str(ro)], check=False)
