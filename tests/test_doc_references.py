"""The files the code's comments, docstrings and the docs cite exist: a renamed or removed
file leaves no docstring pointing at nothing."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A path into this repository: a top-level folder of ours, then a file with an extension.
CITED = re.compile(
    r"\b((?:batchctl|node_image|orchestrators|activities|tests|bench|infra|scripts|docs)"
    r"/[A-Za-z0-9_./-]*[A-Za-z0-9_]\.(?:py|md|bicep|sh|json|txt|toml|yaml))\b"
)


def _tracked(*patterns: str) -> list[Path]:
    listed = subprocess.run(
        ["git", "ls-files", *patterns], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    return [REPO / name for name in listed]


def test_every_cited_file_exists() -> None:
    missing = sorted(
        f"{source.relative_to(REPO)} cites {cited}"
        for source in _tracked("*.py", "*.md", "*.bicep", "Makefile", "*.toml")
        if source.is_file()
        for cited in CITED.findall(source.read_text(errors="replace"))
        if not (REPO / cited).exists()
    )
    assert missing == []


def test_the_pattern_finds_a_citation() -> None:
    # The check above is only as good as its pattern: it must see a plain citation.
    assert CITED.findall("see node_image/worker/loop.py and batchctl/local/app.py.") == [
        "node_image/worker/loop.py",
        "batchctl/local/app.py",
    ]
