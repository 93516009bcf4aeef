"""docs/configuration.md lists every knob of kvtier/settings.py, exactly as the code defines it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.ops.configdoc import BEGIN, END, embed, knobs_table
from kvtier.settings import KNOBS

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_reference_is_current() -> None:
    text = DOC.read_text()
    assert embed(text) == text, "run: python -m kvtier.ops.configdoc --write docs/configuration.md"


def test_every_knob_has_a_row_with_its_three_spellings() -> None:
    table = knobs_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(KNOBS)
    for knob, row in zip(KNOBS, rows, strict=True):
        assert row.startswith(f"| `{knob.env}` | `{knob.extra_key}` |")
        if knob.dynamo_env:
            assert f"`{knob.dynamo_env}`" in row
    assert "| `KVTIER_METRICS_PORT` | `metrics_port` | `DYN_KVBM_METRICS_PORT` | `6880` |" in table
    assert "`DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER` (inverted) | on |" in table


def test_embed_needs_markers() -> None:
    with pytest.raises(ValueError, match="no knob table markers"):
        embed("no markers here")
    assert embed(f"a\n{BEGIN}\nold\n{END}\nb") == f"a\n{BEGIN}\n{knobs_table()}\n{END}\nb"
