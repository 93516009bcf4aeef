"""G3 block files: format, O_DIRECT and buffered round trips, index scan, and every fault."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from dataplane_helpers import ALIGNED_MODEL, MODEL, random_rows

from kvtier.storage.block_file import (
    HEADER_SIZE,
    BlockFileError,
    BlockHeader,
    file_size,
    payload_checksum,
)
from kvtier.storage.disk import DiskBlockError, DiskStorage
from kvtier.storage.host import HostStorage

FP = 0x1234_5678_9ABC_DEF0


def _rows(n: int, nbytes: int, seed: int = 0) -> HostStorage:
    host = HostStorage(n, nbytes)
    host.allocate()
    for i, r in enumerate(random_rows(n, nbytes, seed)):
        host.rows[i] = r
    return host


def test_header_round_trip_and_checks() -> None:
    h = BlockHeader(FP, 2**64 - 1, 7, -3, 6144, 99)
    raw = h.pack()
    assert len(raw) == HEADER_SIZE
    assert BlockHeader.unpack(raw) == h
    assert BlockHeader.unpack(BlockHeader(FP, 5, None, 0, 1, 2).pack()).parent_hash is None
    with pytest.raises(ValueError, match="priority must fit in 32 bits"):
        BlockHeader(FP, 5, None, 2**31, 1, 2)
    bad = bytearray(raw)
    bad[30] ^= 1
    with pytest.raises(BlockFileError, match="header checksum mismatch"):
        BlockHeader.unpack(bytes(bad))
    with pytest.raises(BlockFileError, match="bad magic"):
        BlockHeader.unpack(b"PICKLE!!" + raw[8:])
    with pytest.raises(BlockFileError, match="needs at least"):
        BlockHeader.unpack(raw[:20])
    assert file_size(6144) == 4096 + 8192
    assert file_size(8192) == 4096 + 8192


@pytest.mark.parametrize("o_direct", [True, False])
@pytest.mark.parametrize("model", [MODEL, ALIGNED_MODEL], ids=["bounce", "zero_copy"])
def test_write_read_round_trip(tmp_path: Path, o_direct: bool, model: object) -> None:
    nbytes = model.block_bytes  # type: ignore[attr-defined]
    st = DiskStorage(tmp_path, FP, nbytes, o_direct=o_direct)
    assert st.open() == []
    assert st.o_direct is o_direct  # the test directory's filesystem takes O_DIRECT
    src = _rows(4, nbytes, seed=1)
    for i in range(4):
        st.write(100 + i, src.rows[i], parent_hash=99 + i if i else None, priority=i)
    assert sorted(p.name for p in st.directory.iterdir()) == [
        f"{100 + i:016x}.kvb" for i in range(4)
    ]
    assert all(p.stat().st_size == file_size(nbytes) for p in st.directory.iterdir())
    dst = HostStorage(4, nbytes)
    dst.allocate()
    for i in (3, 0, 2, 1):
        hdr = st.read(100 + i, dst.rows[i])
        assert hdr.sequence_hash == 100 + i and hdr.priority == i
        assert hdr.parent_hash == (99 + i if i else None)
        assert hdr.checksum == payload_checksum(src.rows[i].numpy().tobytes())
    assert torch.equal(dst.rows, src.rows)
    st.close()


def test_reopen_restores_index_and_cleans_leftovers(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    st.open()
    src = _rows(3, MODEL.block_bytes)
    for i in range(3):
        st.write(10 + i, src.rows[i], parent_hash=None if i == 0 else 9 + i)
    (st.directory / f"{99:016x}.kvb.deadbeef.tmp").write_bytes(b"half a block")
    (st.directory / "notes.txt").write_text("left alone")
    again = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    found = again.open()
    assert sorted(e.sequence_hash for e in found) == [10, 11, 12]
    assert {e.parent_hash for e in found} == {None, 10, 11}
    assert not list(st.directory.glob("*.tmp"))
    assert (st.directory / "notes.txt").exists()


def _two_stored(tmp_path: Path) -> tuple[DiskStorage, HostStorage]:
    """An open store holding blocks 1 and 2 (rows 0 and 1 of the returned source rows)."""
    st = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    st.open()
    src = _rows(2, MODEL.block_bytes)
    st.write(1, src.rows[0])
    st.write(2, src.rows[1])
    return st, src


def test_corrupt_payload_is_a_miss_and_removed(tmp_path: Path) -> None:
    st, src = _two_stored(tmp_path)
    path = st.path(1)
    with open(path, "r+b") as f:
        f.seek(HEADER_SIZE + 100)
        byte = f.read(1)
        f.seek(HEADER_SIZE + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    dst = HostStorage(1, MODEL.block_bytes)
    dst.allocate()
    with pytest.raises(DiskBlockError, match="payload checksum mismatch") as info:
        st.read(1, dst.rows[0])
    assert info.value.corrupt and info.value.sequence_hash == 1
    assert "0000000000000001" in str(info.value)
    assert not path.exists()
    st.read(2, dst.rows[0])  # the other block is intact
    assert torch.equal(dst.rows[0], src.rows[1])
    with pytest.raises(DiskBlockError, match="cannot open") as missing:
        st.read(1, dst.rows[0])
    assert not missing.value.corrupt


def test_truncated_file_is_a_miss(tmp_path: Path) -> None:
    st, _ = _two_stored(tmp_path)
    os.truncate(st.path(1), HEADER_SIZE + 1000)
    dst = HostStorage(1, MODEL.block_bytes)
    dst.allocate()
    with pytest.raises(DiskBlockError, match="truncated") as info:
        st.read(1, dst.rows[0])
    assert info.value.corrupt and not st.path(1).exists()
    os.truncate(st.path(2), HEADER_SIZE)
    found = DiskStorage(tmp_path, FP, MODEL.block_bytes).open()
    assert found == [] and not st.path(2).exists()


def test_other_fingerprint_is_skipped_not_served(tmp_path: Path) -> None:
    other = DiskStorage(tmp_path, FP + 1, MODEL.block_bytes)
    other.open()
    other.write(5, _rows(1, MODEL.block_bytes).rows[0])
    ours = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    ours.open()
    os.link(other.path(5), ours.path(5))  # a foreign file under our name
    again = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    assert again.open() == []
    assert again.skipped and "fingerprint" in again.skipped[0][1]
    dst = HostStorage(1, MODEL.block_bytes)
    dst.allocate()
    with pytest.raises(DiskBlockError, match="is not this tier's"):
        again.read(5, dst.rows[0])
    assert other.path(5).exists()  # the other model's block is untouched


def test_o_direct_probe_matches_the_filesystem(small_tmpfs: Path) -> None:
    """tmpfs refuses O_DIRECT on older kernels and takes it on newer ones: the probe must agree
    with the filesystem, and blocks round-trip either way (buffered I/O as the fallback)."""
    try:
        fd = os.open(small_tmpfs / "probe", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        os.close(fd)
        takes_direct = True
    except OSError:
        takes_direct = False
    (small_tmpfs / "probe").unlink(missing_ok=True)
    st = DiskStorage(small_tmpfs, FP, MODEL.block_bytes, o_direct=True)
    st.open()
    assert st.o_direct is takes_direct
    src = _rows(1, MODEL.block_bytes)
    st.write(1, src.rows[0])
    dst = HostStorage(1, MODEL.block_bytes)
    dst.allocate()
    st.read(1, dst.rows[0])
    assert torch.equal(dst.rows[0], src.rows[0])


def test_full_filesystem_keeps_what_is_stored(small_tmpfs: Path) -> None:
    st = DiskStorage(small_tmpfs, FP, MODEL.block_bytes)  # 12 KiB files in a 64 KiB tmpfs
    st.open()
    src = _rows(8, MODEL.block_bytes)
    stored = []
    with pytest.raises(DiskBlockError, match="No space left on device"):
        for i in range(8):
            st.write(i, src.rows[i])
            stored.append(i)
    assert 2 <= len(stored) < 8
    assert not list(st.directory.glob("*.tmp"))  # the failed write left nothing behind
    dst = HostStorage(1, MODEL.block_bytes)
    dst.allocate()
    for i in stored:
        st.read(i, dst.rows[0])
        assert torch.equal(dst.rows[0], src.rows[i])


def test_file_size_limit_is_a_clear_error(tmp_path: Path) -> None:
    """RLIMIT_FSIZE (works without root): the write fails, stored blocks stay readable."""
    st = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    st.open()
    src = _rows(2, MODEL.block_bytes)
    st.write(1, src.rows[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    try:
        with pytest.raises(DiskBlockError, match="write failed: file size limit exceeded") as info:
            st.write(2, src.rows[1])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.sequence_hash == 2 and not info.value.corrupt
    assert not st.path(2).exists() and not list(tmp_path.rglob("*.tmp"))
    out = HostStorage(1, MODEL.block_bytes)
    out.allocate()
    st.read(1, out.rows[0])
    assert torch.equal(out.rows[0], src.rows[0])


def test_read_only_directory(tmp_path: Path) -> None:
    st = DiskStorage(tmp_path, FP, MODEL.block_bytes)
    st.open()
    src = _rows(2, MODEL.block_bytes)
    st.write(1, src.rows[0])
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "--bind", "-o", "ro", str(tmp_path), str(ro)], check=False)
        if done.returncode != 0:
            pytest.skip("read-only bind mount failed")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=False)
    else:
        os.rename(tmp_path / f"{FP:016x}", ro / f"{FP:016x}")
        os.chmod(ro / f"{FP:016x}", 0o555)
    try:
        reader = DiskStorage(ro, FP, MODEL.block_bytes)
        found = reader.open()
        assert [e.sequence_hash for e in found] == [1]
        assert reader.writable is False
        out = HostStorage(1, MODEL.block_bytes)
        out.allocate()
        reader.read(1, out.rows[0])
        assert torch.equal(out.rows[0], src.rows[0])
        with pytest.raises(DiskBlockError, match="is not writable"):
            reader.write(2, src.rows[1])
        reader.close()  # its folder descriptor would keep the mount busy
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(ro)], check=False)


def test_directory_that_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create disk cache directory"):
        DiskStorage(blocker, FP, MODEL.block_bytes).open()
