"""The user's own work as data: a model file or a code package, uploaded once, content-addressed.

A run names its own model (``--model my.keras``, ``Name@my.weights.h5``) or code package
(``--code DIR``) as a file on the user's machine; the client uploads it under its SHA-256
(``_artifacts/sha256/HEX/NAME`` in the media container, which the client may write and every
node may read) and the run's options carry the reference ``sha256:HEX/NAME``, never a path.
Each node downloads an artifact once, checks its hash before using a byte of it, and keeps it
by hash; locally the worker processes do the same, so a local run reads the uploaded copy,
never the user's file. A reference in the options also fingerprints the work
(``--skip-existing``) and tells the report what ran.

Code packages are deterministic zip files (sorted entries, fixed times and modes), so the
same directory is the same package: :func:`pack_code` builds one, refusing what must not
travel (a symlink out of the directory, a file or a package over its limit) with the file
named; :func:`unpack_code` refuses every entry that could land outside its folder (zip slip).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from batchctl.contracts import RunOptions

if TYPE_CHECKING:
    from batchctl.storage import BlobStore

REF_PATTERN = re.compile(r"^sha256:(?P<digest>[0-9a-f]{64})/(?P<name>[A-Za-z0-9._-]{1,200})$")
ARTIFACT_PREFIX = "_artifacts/sha256"
# A code package's limits: source code and a small model or two, not a dataset. Large
# models travel on their own (--model), weights baked into an image (--image).
MAX_CODE_FILE_BYTES = 64 * 1024**2
MAX_CODE_PACKAGE_BYTES = 256 * 1024**2
MAX_CODE_FILES = 10_000
CODE_PACKAGE_NAME = "code.zip"
IGNORE_FILES = (".gitignore", ".batchctlignore")
# Never packed: version control, caches and environments, whatever the ignore files say.
ALWAYS_IGNORED = (".git/", "__pycache__/", "*.pyc", ".venv/", "venv/", ".mypy_cache/")
# Every entry gets this time and these modes: the package's hash depends on content only.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_FILE_MODE = 0o644


class ArtifactError(ValueError):
    """The user's work cannot travel or cannot be used as sent (bad input, names the file)."""


class ArtifactMismatchError(ArtifactError):
    """What was downloaded is not what the reference names (its SHA-256 differs)."""


@dataclass(frozen=True)
class ArtifactRef:
    """``sha256:HEX/NAME``: an uploaded file, by content."""

    digest: str
    name: str

    def __str__(self) -> str:
        return f"sha256:{self.digest}/{self.name}"

    @property
    def blob_name(self) -> str:
        return f"{ARTIFACT_PREFIX}/{self.digest}/{self.name}"


def parse_ref(text: str) -> ArtifactRef | None:
    """The reference ``text`` is, or None when it is no reference (a name or a path)."""
    match = REF_PATTERN.match(text)
    return ArtifactRef(match["digest"], match["name"]) if match else None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_name(name: str) -> str:
    """A file name as a reference may carry it (letters, digits, '.', '_', '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:200].strip(".") or "file"
    return cleaned


# -- the model: a reference in place of a local file ---------------------------------------
def model_file_of(model: str) -> Path | None:
    """The local file a ``--model`` value names (the .keras file, or the weights after '@'),
    or None (a keras.applications name, or already a reference)."""
    candidate = model.partition("@")[2] if "@" in model else model
    if not candidate or parse_ref(candidate) is not None:
        return None
    path = Path(candidate).expanduser()
    return path if path.is_file() else None


def with_model_ref(model: str, ref: ArtifactRef) -> str:
    """``model`` with its local file replaced by ``ref``."""
    return f"{model.partition('@')[0]}@{ref}" if "@" in model else str(ref)


def model_refs(model: str) -> list[ArtifactRef]:
    """The references a model value carries (none for a name or a node-local path)."""
    ref = parse_ref(model.partition("@")[2] if "@" in model else model)
    return [] if ref is None else [ref]


# -- code packages ----------------------------------------------------------------------------
def _ignore_spec(root: Path) -> Callable[[str], bool]:
    import pathspec

    lines = list(ALWAYS_IGNORED)
    for name in IGNORE_FILES:
        ignore_file = root / name
        if ignore_file.is_file():
            lines.extend(ignore_file.read_text(errors="replace").splitlines())
    spec = pathspec.PathSpec.from_lines("gitwildmatch", lines)
    return spec.match_file


def code_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(archive name, file) for every file a package of ``root`` holds, in a fixed order.

    ArtifactError for a symlink that leads out of ``root`` (one inside is followed: its
    target's content is packed under the link's name) and for anything not a file or folder.
    """
    root = root.resolve()
    ignored = _ignore_spec(root)
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        relative_folder = here.relative_to(root).as_posix()
        dirs.sort()
        keep = []
        for name in dirs:
            path = here / name
            relative = f"{relative_folder}/{name}".lstrip("./") if relative_folder != "." else name
            if ignored(relative + "/"):
                continue
            if path.is_symlink():
                _check_link(root, path)
                raise ArtifactError(
                    f"{path}: a symlink to a folder; copy the folder in, or list it in "
                    ".batchctlignore"
                )
            keep.append(name)
        dirs[:] = keep
        for name in sorted(files):
            path = here / name
            relative = name if relative_folder == "." else f"{relative_folder}/{name}"
            if ignored(relative):
                continue
            if path.is_symlink():
                _check_link(root, path)
            mode = path.stat().st_mode
            if not stat.S_ISREG(mode):
                raise ArtifactError(f"{path}: not a regular file (a device, pipe or socket)")
            yield relative, path


def _check_link(root: Path, link: Path) -> None:
    target = link.resolve()
    if target != root and root not in target.parents:
        raise ArtifactError(
            f"{link}: a symlink leading out of {root} (to {target}); a code package holds "
            "only what is inside its folder"
        )


def pack_code(
    root: Path,
    *,
    max_file_bytes: int = MAX_CODE_FILE_BYTES,
    max_package_bytes: int = MAX_CODE_PACKAGE_BYTES,
    max_files: int = MAX_CODE_FILES,
) -> bytes:
    """The deterministic zip of ``root`` (see the module docstring); ArtifactError naming
    the file for what must not travel."""
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a folder (--code takes the folder of your task)")
    buffer = io.BytesIO()
    total = 0
    count = 0
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as archive:
        for name, path in code_files(root):
            size = path.stat().st_size
            if size > max_file_bytes:
                raise ArtifactError(
                    f"{path}: {size} bytes, over the {max_file_bytes}-byte limit for a file "
                    "of a code package (a model travels with --model; or list it in "
                    ".batchctlignore)"
                )
            total += size
            count += 1
            if total > max_package_bytes:
                raise ArtifactError(
                    f"{root}: over the {max_package_bytes}-byte limit for a code package at "
                    f"{path} (list what the task does not need in .batchctlignore)"
                )
            if count > max_files:
                raise ArtifactError(f"{root}: over {max_files} files for a code package")
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.external_attr = (stat.S_IFREG | _FILE_MODE) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, path.read_bytes())
    if count == 0:
        raise ArtifactError(f"{root}: no files to pack (all ignored?)")
    return buffer.getvalue()


def unpack_code(package: bytes, destination: Path) -> None:
    """Extract a code package into ``destination`` (created), refusing any entry that is
    absolute, climbs out with '..', is a link or is not a plain file or folder."""
    destination.mkdir(parents=True, exist_ok=True)
    root = destination.resolve()
    with zipfile.ZipFile(io.BytesIO(package)) as archive:
        for info in archive.infolist():
            name = info.filename
            pure = PurePosixPath(name)
            mode = info.external_attr >> 16
            if (
                pure.is_absolute()
                or ".." in pure.parts
                or "\\" in name
                or (len(name) > 1 and name[1] == ":")
            ):
                raise ArtifactError(f"code package entry {name!r} would land outside its folder")
            if mode and stat.S_ISLNK(mode):
                raise ArtifactError(f"code package entry {name!r} is a symlink")
            target = (root / pure).resolve()
            if target != root and root not in target.parents:
                raise ArtifactError(f"code package entry {name!r} would land outside its folder")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as source, target.open("wb") as out:
                while block := source.read(1 << 20):
                    out.write(block)


# -- storage: upload once, fetch once, verify always --------------------------------------------
class ArtifactStore:
    """Content-addressed artifacts in a container of a :class:`~batchctl.storage.BlobStore`."""

    def __init__(self, store: BlobStore, container: str) -> None:
        self._store = store
        self._container = container

    def put_file(self, path: Path, name: str | None = None) -> ArtifactRef:
        """Upload ``path`` unless its content is there already; its reference."""
        ref = ArtifactRef(sha256_of(path), safe_name(name or path.name))
        if not self._store.exists(self._container, ref.blob_name):
            self._store.upload_file(self._container, ref.blob_name, path)
        return ref

    def put_bytes(self, data: bytes, name: str) -> ArtifactRef:
        ref = ArtifactRef(hashlib.sha256(data).hexdigest(), safe_name(name))
        if not self._store.exists(self._container, ref.blob_name):
            self._store.upload_bytes(self._container, ref.blob_name, data)
        return ref

    def fetch(self, ref: ArtifactRef, cache: Path) -> Path:
        """The artifact as a local file under ``cache`` (downloaded once, kept by hash),
        checked against its hash first: ArtifactMismatchError for other content."""
        target = cache / ref.digest / ref.name
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            # Hashed as it streams to disk: a model of gigabytes never sits in memory whole.
            digest = hashlib.sha256()
            with os.fdopen(handle, "wb") as part:
                for chunk in self._store.download_chunks(self._container, ref.blob_name):
                    digest.update(chunk)
                    part.write(chunk)
            found = digest.hexdigest()
            if found != ref.digest:
                raise ArtifactMismatchError(
                    f"artifact {ref} arrived with SHA-256 {found}: not what the run names "
                    "(changed in storage after the upload?); refusing it"
                )
            os.replace(temporary, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
        return target


def has_local_work(options: RunOptions) -> bool:
    """True when ``options`` name a model file or code folder of this machine to upload."""
    return model_file_of(options.model) is not None or (
        options.code is not None and parse_ref(options.code) is None
    )


def publish_own_work(options: RunOptions, store: BlobStore, container: str) -> RunOptions:
    """The client's part: ``options`` with a local model file and a code folder uploaded
    (once, by content) and replaced by their references. A model that names no local file
    (a keras.applications name, a reference, a path on the node's own disk) is kept as is."""
    artifacts = ArtifactStore(store, container)
    code_ref = parse_ref(options.code or "")
    named = [*model_refs(options.model), *([code_ref] if code_ref is not None else [])]
    missing = [ref for ref in named if not store.exists(container, ref.blob_name)]
    if missing:
        # A retry of a local run whose storage is gone, or another deployment's reference.
        raise ArtifactError(
            f"the run names {missing[0]}, which this storage does not hold: give --model FILE "
            "and --code DIR again (a local run's uploads go with its storage)"
        )
    update: dict[str, str] = {}
    model_file = model_file_of(options.model)
    if model_file is not None:
        update["model"] = with_model_ref(options.model, artifacts.put_file(model_file))
    if options.code is not None and parse_ref(options.code) is None:
        package = pack_code(Path(options.code).expanduser())
        update["code"] = str(artifacts.put_bytes(package, CODE_PACKAGE_NAME))
    return options.model_copy(update=update) if update else options
