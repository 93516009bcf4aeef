"""Model identity in G3's key space: two models of one shape never see each other's blocks."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from dataplane_helpers import MODEL, engine_tensors, random_rows

from kvtier import KvBlockManager
from kvtier.config import KvTierConfig
from kvtier.storage.identity import ModelIdentity, weights_digest

H = [0x100 + i for i in range(4)]


def _manager(disk: Path, ident: ModelIdentity | None) -> KvBlockManager:
    cfg = KvTierConfig(
        model=MODEL, disk_blocks=8, disk_dir=str(disk), disk_filter=False, model_identity=ident
    )
    mgr = KvBlockManager(cfg)
    mgr.register_device_kv(engine_tensors("block_first", MODEL, 8, seed=1))
    mgr.start()
    return mgr


def _offload(mgr: KvBlockManager, rows: list[torch.Tensor]) -> None:
    assert mgr.device_pool is not None
    for i, r in enumerate(rows):
        mgr.device_pool.storage.write_block(i, r)
    mgr.wait(mgr.offload(list(range(len(rows))), H[: len(rows)]), timeout=30)


def test_two_models_of_one_shape_never_see_each_others_blocks(tmp_path: Path) -> None:
    a = ModelIdentity(model="/models/a", weights="1111", dtype="bfloat16")
    b = ModelIdentity(model="/models/b", weights="2222", dtype="bfloat16")
    rows = random_rows(4, MODEL.block_bytes, seed=2)
    with _manager(tmp_path, a) as ma:
        _offload(ma, rows)
        with _manager(tmp_path, b) as mb:  # same layout, same directory, running together
            assert mb.disk_pool is not None and mb.disk_pool.pool.num_registered == 0
            match = mb.match(H)
            assert len(match) == 0  # a's files are not b's blocks, not even by file name
            match.release()
            _offload(mb, random_rows(4, MODEL.block_bytes, seed=3))
        match = ma.match(H)
        assert match.num_disk == 4  # b neither saw nor touched a's blocks
        on = ma.onboard(match, [4, 5, 6, 7])
        ma.wait(on, timeout=30)
        assert ma.device_pool is not None
        assert on.ok and all(
            torch.equal(ma.device_pool.storage.read_block(4 + i), rows[i]) for i in range(4)
        )
    folders = sorted(p.name for p in tmp_path.iterdir())
    assert len(folders) == 2  # one namespace folder per model


def test_model_id_shares_or_separates_on_purpose(tmp_path: Path) -> None:
    one = ModelIdentity(model="/copy/one", weights="1", dtype="bfloat16", model_id="llama-8b@v3")
    two = ModelIdentity(model="/copy/two", weights="2", dtype="bfloat16", model_id="llama-8b@v3")
    assert one.namespace(7) == two.namespace(7)  # the operator says they are one model
    rows = random_rows(2, MODEL.block_bytes, seed=4)
    with _manager(tmp_path, one) as m1:
        _offload(m1, rows)
    with _manager(tmp_path, two) as m2:
        assert len(m2.match(H[:2])) == 2
    other = ModelIdentity(model="/copy/one", weights="1", dtype="bfloat16", model_id="other")
    assert other.namespace(7) != one.namespace(7)


def test_every_field_that_changes_the_bytes_changes_the_namespace() -> None:
    base = ModelIdentity(model="m", revision="r", weights="w", dtype="bfloat16", tp_size=2)
    variants = [
        ModelIdentity(model="m2", revision="r", weights="w", dtype="bfloat16", tp_size=2),
        ModelIdentity(model="m", revision="r2", weights="w", dtype="bfloat16", tp_size=2),
        ModelIdentity(model="m", revision="r", weights="w2", dtype="bfloat16", tp_size=2),
        ModelIdentity(model="m", revision="r", weights="w", dtype="float16", tp_size=2),
        ModelIdentity(model="m", revision="r", weights="w", dtype="bfloat16", tp_size=2, tp_rank=1),
        ModelIdentity(model="m", revision="r", weights="w", dtype="bfloat16", tp_size=4),
        ModelIdentity(
            model="m", revision="r", weights="w", dtype="bfloat16", tp_size=2, model_id="x"
        ),
    ]
    keys = {v.namespace(1) for v in variants} | {base.namespace(1), base.namespace(2)}
    assert len(keys) == len(variants) + 2
    assert base.namespace(1) == ModelIdentity(**base.__dict__).namespace(1)  # deterministic
    with pytest.raises(ValueError, match="tp_rank"):
        ModelIdentity(tp_rank=2, tp_size=2)


def _checkpoint(folder: Path, weights: bytes) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"hidden_size": 128, "num_hidden_layers": 2}))
    (folder / "model.safetensors").write_bytes(b"HDR" + weights)
    return folder


def test_weights_digest_tells_weights_apart_and_copies_alike(tmp_path: Path) -> None:
    a = _checkpoint(tmp_path / "a", bytes(range(256)) * 1024)
    b = _checkpoint(tmp_path / "b", bytes(reversed(range(256))) * 1024)  # same size, same config
    copy = _checkpoint(tmp_path / "copy", bytes(range(256)) * 1024)
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) == weights_digest(copy)
    assert weights_digest(tmp_path / "not-a-folder") == ""


def test_identity_from_a_vllm_config(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path / "ckpt", b"w" * 1000)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(
            model=str(ckpt), revision=None, dtype="torch.bfloat16", model_weights=""
        )
    )
    ident = ModelIdentity.from_vllm_config(cfg, tp_rank=1, tp_size=2)
    assert ident == ModelIdentity(
        model=str(ckpt), weights=weights_digest(ckpt), dtype="bfloat16", tp_rank=1, tp_size=2
    )
    named = ModelIdentity.from_vllm_config(cfg, tp_rank=0, tp_size=1, model_id="shared")
    assert named.fields() == {"model_id": "shared", "dtype": "bfloat16", "tp_rank": 0, "tp_size": 1}
