"""``kvtier inspect`` and ``kvtier fsck`` on a real disk tier written by ``DiskStorage``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from kvtier.ops.cli import main
from kvtier.ops.diskscan import fsck_dir, inspect_dir
from kvtier.storage.disk import DiskStorage

FP = 0x1234_5678_9ABC_DEF0
OTHER_FP = 0x0FED_CBA9_8765_4321
BLOCK = 8192


def row(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BLOCK,), dtype=torch.uint8, generator=g)


@pytest.fixture
def tier(tmp_path: Path) -> tuple[Path, DiskStorage]:
    """Five good blocks of FP, two of another layout, one corrupt, one truncated, one temp file."""
    disk = DiskStorage(tmp_path, FP, BLOCK, o_direct=False)
    disk.open()
    for h in range(1, 6):
        disk.write(h, row(h), parent_hash=h - 1 if h > 1 else None)
    other = DiskStorage(tmp_path, OTHER_FP, BLOCK // 2, o_direct=False)
    other.open()
    for h in (100, 101):
        other.write(h, row(h)[: BLOCK // 2].clone())
    disk.write(6, row(6))
    with open(disk.path(6), "r+b") as f:  # flip one payload byte
        f.seek(4096 + 17)
        b = f.read(1)
        f.seek(4096 + 17)
        f.write(bytes([b[0] ^ 0xFF]))
    disk.write(7, row(7))
    os.truncate(disk.path(7), 4096 + 100)
    (disk.directory / "0000000000000009.kvb.deadbeef.tmp").write_bytes(b"half")
    return tmp_path, disk


def test_inspect_counts_fingerprints_bytes_and_ages(tier: tuple[Path, DiskStorage]) -> None:
    root, disk = tier
    now = disk.path(1).stat().st_mtime
    old = now - 2 * 3600
    os.utime(disk.path(1), (old, old))
    report = inspect_dir(root, now=now + 1)
    # Headers only: the corrupt payload still counts; the truncated file's header is intact too.
    assert report.blocks == 9
    assert report.fingerprints == {FP: 7, OTHER_FP: 2}
    assert report.payload_bytes == 7 * BLOCK + 2 * (BLOCK // 2)
    assert report.file_bytes == 6 * (4096 + BLOCK) + (4096 + 100) + 2 * (4096 + BLOCK // 2)
    assert report.other_files == 1
    assert dict(report.age_histogram) == {
        "< 1 min": 8,
        "< 10 min": 0,
        "< 1 h": 0,
        "< 1 day": 1,
        "< 1 week": 0,
        ">= 1 week": 0,
    }
    only_fp = inspect_dir(disk.directory)
    assert only_fp.fingerprints == {FP: 7}


def test_fsck_reports_then_repairs_and_good_blocks_survive(
    tier: tuple[Path, DiskStorage],
) -> None:
    root, disk = tier
    report = fsck_dir(root)
    assert (report.checked, report.good) == (9, 7)
    reasons = {Path(b.path).name: b.reason for b in report.bad}
    assert reasons == {
        "0000000000000006.kvb": "payload checksum mismatch (corrupted data)",
        "0000000000000007.kvb": f"file is {4096 + 100} bytes, expected {4096 + BLOCK} (truncated?)",
        "0000000000000009.kvb.deadbeef.tmp": "leftover temporary file of an interrupted write",
    }
    assert not any(b.removed for b in report.bad)
    assert disk.path(6).exists() and disk.path(7).exists()  # without --repair nothing is removed

    repaired = fsck_dir(root, repair=True)
    assert all(b.removed for b in repaired.bad) and len(repaired.bad) == 3
    assert not disk.path(6).exists() and not disk.path(7).exists()
    again = fsck_dir(root)
    assert (again.checked, again.good, again.bad) == (7, 7, [])
    reopened = DiskStorage(root, FP, BLOCK, o_direct=False)
    assert sorted(s.sequence_hash for s in reopened.open()) == [1, 2, 3, 4, 5]
    out = torch.empty(BLOCK, dtype=torch.uint8)
    for h in range(1, 6):
        reopened.read(h, out)
        assert torch.equal(out, row(h))


def test_fsck_catches_a_renamed_block(tmp_path: Path) -> None:
    disk = DiskStorage(tmp_path, FP, BLOCK, o_direct=False)
    disk.open()
    disk.write(1, row(1))
    disk.path(1).rename(disk.path(2))
    (bad,) = fsck_dir(tmp_path).bad
    assert bad.reason == "holds sequence hash 0000000000000001, named 0000000000000002.kvb"


def test_cli_inspect_and_fsck(
    tier: tuple[Path, DiskStorage], capsys: pytest.CaptureFixture[str]
) -> None:
    root, _ = tier
    out_json = root / "inspect.json"
    assert main(["inspect", str(root), "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "0x123456789abcdef0 (7 blocks)" in text
    doc = json.loads(out_json.read_text())
    assert doc["blocks"] == 9 and doc["fingerprints"] == {f"{FP:016x}": 7, f"{OTHER_FP:016x}": 2}

    assert main(["fsck", str(root)]) == 1
    text = capsys.readouterr().out
    assert "checked 9 block files: 7 good, 3 bad" in text
    assert "--repair" in text
    assert main(["fsck", str(root), "--repair"]) == 0
    assert main(["fsck", str(root)]) == 0
    assert "checked 7 block files: 7 good, 0 bad" in capsys.readouterr().out


def test_cli_refuses_a_missing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["fsck", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().out
    (tmp_path / "file").write_text("x")
    assert main(["inspect", str(tmp_path / "file")]) == 2
    assert "not a directory" in capsys.readouterr().out


def test_cli_says_when_a_directory_is_not_a_tier(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "notes.txt").write_text("not a cache")
    (tmp_path / "photos").mkdir()
    for cmd in ("fsck", "inspect"):
        assert main([cmd, str(tmp_path)]) == 2
        assert "is not a kvtier disk tier" in " ".join(capsys.readouterr().out.split())


_WRITER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)  # what DiskStorage.write holds until it publishes
os.write(fd, b"half a block")
print("writing", flush=True)
time.sleep(600)
"""


def test_fsck_on_a_live_tier_leaves_writes_in_progress_alone(
    tier: tuple[Path, DiskStorage], capsys: pytest.CaptureFixture[str]
) -> None:
    import subprocess
    import sys

    root, disk = tier
    live = disk.directory / f"{42:016x}.kvb.{os.getpid()}.tmp"
    writer = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(live)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        report = fsck_dir(root, repair=True)
        assert report.writes_in_progress == 1
        assert live.exists()  # another process's write in progress: not bad, not removed
        assert not any(b.path == str(live) for b in report.bad)
        reopened = DiskStorage(root, FP, BLOCK, o_direct=False)
        reopened.open()  # an engine starting beside it leaves it alone too
        assert live.exists()
        reopened.close()
        assert main(["fsck", str(root)]) == 0
        assert "1 writes in progress (neither is bad)" in " ".join(capsys.readouterr().out.split())
    finally:
        writer.kill()
        writer.wait()
    (bad,) = fsck_dir(root).bad  # its writer died: now it is a leftover
    assert bad.path == str(live) and "leftover" in bad.reason


def test_inspect_shows_the_model_identity(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvtier.storage.identity import ModelIdentity

    ident = ModelIdentity(model="org/llama-tiny", revision="r1", weights="ab12", dtype="bfloat16")
    ns = ident.namespace(FP)
    disk = DiskStorage(tmp_path, ns, BLOCK, o_direct=False, identity=ident.describe(FP))
    disk.open()
    disk.write(1, row(1))
    report = inspect_dir(tmp_path)
    assert report.identities[ns]["model"] == "org/llama-tiny"
    assert report.identities[ns]["layout_fingerprint"] == f"{FP:016x}"
    assert report.identities[ns]["block_bytes"] == BLOCK
    assert report.blocks == 1 and report.other_files == 0  # the identity file is the tier's own
    assert main(["inspect", str(tmp_path)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "model=org/llama-tiny" in text and "revision=r1" in text
    disk.close()
