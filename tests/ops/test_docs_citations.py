"""Docs and docstrings cite only what the repository holds (the field guide is not in it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CITATION = re.compile(r"\bGUIDE\b(\s+section)?", re.I)


def test_no_citation_of_the_field_guide() -> None:
    files = [ROOT / "README.md", *ROOT.glob("docs/**/*.md"), *ROOT.glob("benchmarks/*.md")]
    files += [*ROOT.glob("kvtier/**/*.py"), *ROOT.glob("benchmarks/*.py")]
    assert len(files) > 20
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in files
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if CITATION.search(line) and "field guide" not in line.lower()
    ]
    assert not hits, "cites a guide that is not in the repository:\n" + "\n".join(hits)
