"""The user's own work on a node: the run's model file and code package, by reference.

A run's options may name its model and its code as content references (``sha256:HEX/NAME``,
see batchctl.artifacts) instead of anything on the node's disk. Before the task is set up,
once per process:

- every referenced artifact is downloaded from the run's storage into this node's cache
  (kept by hash, so a node downloads each once) and its SHA-256 checked before use: a
  mismatch refuses the task (TaskConfigError); the node reports the refusal once and takes
  no message, and the run ends failed with the reason (batchctl.refusals);
- a code package is unpacked (zip-slip safe) into a folder of its own, keyed by its hash,
  which goes first on ``sys.path`` (the task's module and its helpers import from the run's
  own package); a ``requirements.txt`` in it is installed into a folder beside it (``pip
  install --target``, bounded in time, once per package hash), which goes LAST on
  ``sys.path``: pip installs every dependency there, and a copy of numpy or TensorFlow
  pulled in by a requirement must not shadow the image's own;
- the task then sees the model as a local file, as it always did.

One worker process runs one job of one run, so two runs whose packages hold modules of the
same name never share an interpreter.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from batchctl.artifacts import (
    ArtifactError,
    ArtifactStore,
    model_refs,
    parse_ref,
    unpack_code,
)
from batchctl.storage import BlobStore

from .errors import TaskConfigError
from .taskapi import Task, TaskSetup

log = logging.getLogger(__name__)

REQUIREMENTS_FILE = "requirements.txt"
# A package's requirements must install within this (pip resolving and downloading on a
# fresh node); past it the task is refused with pip's last words.
PIP_TIMEOUT_S = 600.0
_lock = threading.Lock()


def cache_root(work_dir: Path | None) -> Path:
    """Where a node keeps the runs' artifacts: beside its downloads, for the node's life
    (shared by the node's worker processes: every entry appears whole, by rename)."""
    return (work_dir or Path(tempfile.gettempdir())) / "batchctl-artifacts"


def resolve_model(model: str, artifacts: ArtifactStore, cache: Path) -> str:
    """``model`` with a referenced file replaced by its checked local copy."""
    for ref in model_refs(model):
        local = artifacts.fetch(ref, cache)
        if "@" in model:
            return f"{model.partition('@')[0]}@{local}"
        return str(local)
    return model


def install_code(ref_text: str, artifacts: ArtifactStore, cache: Path) -> list[Path]:
    """Fetch, check and unpack a code package (and install its requirements) once; the
    package's folder, then its requirements' folder when it has one."""
    ref = parse_ref(ref_text)
    if ref is None:
        raise TaskConfigError(f"code {ref_text!r} is not a package reference sha256:HEX/NAME")
    folder = cache / f"{ref.digest}-code"
    site = cache / f"{ref.digest}-site"
    with _lock:
        if not folder.is_dir():
            package = artifacts.fetch(ref, cache)
            _build_whole(folder, lambda scratch: unpack_code(package.read_bytes(), scratch))
        requirements = folder / REQUIREMENTS_FILE
        if requirements.is_file() and not site.is_dir():
            _build_whole(site, lambda scratch: _pip_install(requirements, scratch))
    return [folder, site] if site.is_dir() else [folder]


def _build_whole(target: Path, build: Callable[[Path], None]) -> None:
    """Build ``target`` in a scratch folder beside it, then rename it into place: another
    worker process of the node never sees half of it (if one got there first, ours goes)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(scratch)
        try:
            os.rename(scratch, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pip_install(requirements: Path, target: Path) -> None:
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-input", "--target", str(target), "-r", str(requirements),
    ]  # fmt: skip
    log.info("installing the code package's %s into %s", REQUIREMENTS_FILE, target)
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise TaskConfigError(
            f"the code package's {REQUIREMENTS_FILE} did not install within {PIP_TIMEOUT_S:.0f} s"
        ) from None
    if done.returncode != 0:
        said = " ".join((done.stderr or done.stdout).split())[-600:]
        raise TaskConfigError(
            f"the code package's {REQUIREMENTS_FILE} failed to install (pip exit "
            f"{done.returncode}): {said}"
        )


def own_work_factory(
    store: BlobStore,
    container: str,
    cache: Path,
    create: Callable[[TaskSetup], Task],
) -> Callable[[TaskSetup], Task]:
    """The task factory with the run's own work made local first (see the module docstring)."""
    artifacts = ArtifactStore(store, container)

    def factory(setup: TaskSetup) -> Task:
        options = setup.options
        try:
            model = resolve_model(options.model, artifacts, cache)
            if options.code is not None:
                code, *dependencies = install_code(options.code, artifacts, cache)
                if str(code) not in sys.path:
                    sys.path.insert(0, str(code))
                # After the image's packages (see the module docstring).
                sys.path.extend(str(d) for d in dependencies if str(d) not in sys.path)
                importlib.invalidate_caches()
        except ArtifactError as error:
            raise TaskConfigError(str(error)) from None
        local = options.model_copy(update={"model": model}) if model != options.model else options
        return create(replace(setup, options=local))

    return factory
