"""The node image's build context for `az acr build`, and a tag that names its content.

The image installs the batchctl library next to the worker, so its context is a staged copy
of the repository's image sources (not the repository root, which holds virtual environments
and node_modules). The tag is a hash of those sources: `azd provision` then rebuilds the image
only when they change (see preprovision.sh and postprovision.sh).

Usage: python3 infra/hooks/node_image.py tag | stage DIR
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What the Dockerfile (node_image/Dockerfile, built with this staged tree as its context) sees.
SOURCES = ("node_image", "batchctl", "pyproject.toml", "README.md")
IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache")
TAG_LENGTH = 16


def _files() -> list[Path]:
    found: list[Path] = []
    for name in SOURCES:
        path = ROOT / name
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(
                p
                for p in path.rglob("*")
                if p.is_file()
                and "__pycache__" not in p.parts
                and p.suffix != ".pyc"
                and not any(part.endswith(".egg-info") for part in p.parts)
            )
    return sorted(found)


def content_tag() -> str:
    """A short hash over the relative paths and bytes of every image source file."""
    digest = hashlib.sha256()
    for path in _files():
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:TAG_LENGTH]


def stage(target: Path) -> None:
    """Copy the image sources into ``target``, keeping their paths relative to the repo root."""
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, target / name, ignore=IGNORED, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, target / name)


def main(argv: list[str]) -> int:
    if argv[:1] == ["tag"] and len(argv) == 1:
        print(content_tag())
        return 0
    if argv[:1] == ["stage"] and len(argv) == 2:
        stage(Path(argv[1]))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
