"""What a run on this machine needs, checked for real (no Azure here, so nothing to fake).

Each check is one function returning a CheckResult; ``local_checks`` runs them in order.
The probe is a real ``batchctl run`` in a child process: a generated 1 s video, one item, the
built-in features task on its fast (keyframe) path, MobileNetV3Small at 32x32, one node, its
own Azurite. It states exactly that on its line, and how long it took.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from batchctl.doctor.report import CheckResult, fail, ok, skip

REPO_ROOT = Path(__file__).resolve().parents[2]
# What a local run imports: the library's own dependencies, then the worker's (the local
# "nodes" run the node image's worker code here).
CORE_MODULES = (
    "pydantic",
    "pydantic_settings",
    "azure.storage.blob",
    "azure.storage.queue",
    "azure.data.tables",
    "azure.identity",
    "azure.durable_functions",
    "aiohttp",
    "rich",
)
WORKER_MODULES = ("numpy", "keras", "tensorflow")
# The worker opens media only through these protocols (node_image/worker/media.py,
# PROTOCOL_WHITELIST): the check proves this ffprobe refuses anything else.
PROTOCOL_WHITELIST = "file,pipe"
MIN_FREE_BYTES = 2 * 1024**3
TOOL_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 600.0
PROBE_MODEL = "MobileNetV3Small"
PROBE_FRAME_SIZE = "32"
WEIGHTS_DIR_ENV = "BATCHCTL_WEIGHTS_DIR"
# A probe uses its own Azurite: storage variables of the caller's shell must not send it
# to a real account.
_STORAGE_VARIABLES = ("BATCHCTL_BLOB_URL", "BATCHCTL_QUEUE_URL", "BATCHCTL_TABLE_URL")

Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def _run(command: list[str], timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0].strip()


def check_python_modules(
    find: Callable[[str], object | None] = importlib.util.find_spec,
) -> CheckResult:
    """The library's and the worker's modules are importable in this interpreter."""

    def missing(names: tuple[str, ...]) -> list[str]:
        absent = []
        for name in names:
            try:
                if find(name) is None:
                    absent.append(name)
            except (ImportError, ValueError):  # a parent package missing raises
                absent.append(name)
        return absent

    core, worker = missing(CORE_MODULES), missing(WORKER_MODULES)
    what = f"Python {sys.version.split()[0]} modules"
    if core:
        return fail(what, f"missing {', '.join(core)}: pip install -e . (or make test)")
    if worker:
        return fail(
            what,
            f"missing {', '.join(worker)} (the local nodes run the worker): "
            "pip install -e '.[worker]'",
        )
    return ok(f"{what}: library and worker dependencies importable")


def make_probe_video(path: Path, ffmpeg: str) -> None:
    """A 1 s, 64x64, 10 fps H.264 MP4 from ffmpeg's own test source (keyframe every 5)."""
    command = [
        ffmpeg, "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", "testsrc2=size=64x64:rate=10:duration=1",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "5",
        str(path),
    ]  # fmt: skip
    done = _run(command)
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(_first_line(done.stderr) or f"ffmpeg exited {done.returncode}")


def check_ffmpeg(workdir: Path, which: Callable[[str], str | None] = shutil.which) -> CheckResult:
    """ffmpeg and ffprobe present, their versions, and the protocol whitelist honoured."""
    ffmpeg, ffprobe = which("ffmpeg"), which("ffprobe")
    what = "ffmpeg/ffprobe"
    if ffmpeg is None or ffprobe is None:
        absent = " and ".join(n for n, p in (("ffmpeg", ffmpeg), ("ffprobe", ffprobe)) if not p)
        return fail(what, f"{absent} not on PATH: apt-get install ffmpeg (or make test)")
    versions = []
    for binary in (ffmpeg, ffprobe):
        done = _run([binary, "-hide_banner", "-version"])
        if done.returncode != 0:
            return fail(what, f"{binary} -version exited {done.returncode}: reinstall ffmpeg")
        # "ffmpeg version 5.1.6-0+deb12u1 Copyright ..." -> "ffmpeg 5.1.6-0+deb12u1"
        words = _first_line(done.stdout).split()
        versions.append(" ".join(words[:1] + words[2:3]) or "unknown version")
    video = workdir / "doctor-probe.mp4"
    try:
        make_probe_video(video, ffmpeg)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        return fail(
            what, f"cannot encode a test video with libx264 ({error}): install Debian's ffmpeg"
        )
    allowed = _run(
        [ffprobe, "-v", "error", "-protocol_whitelist", PROTOCOL_WHITELIST,
         "-show_entries", "format=duration", "-of", "json", f"file:{video}"]
    )  # fmt: skip
    if allowed.returncode != 0:
        return fail(what, f"ffprobe cannot read a local file with -protocol_whitelist "
                    f"{PROTOCOL_WHITELIST}: {_first_line(allowed.stderr)}")  # fmt: skip
    # A URL of a protocol outside the list must be refused before any connection is tried
    # (nothing listens on port 9 either way, so a refusal of another kind proves nothing).
    refused = _run(
        [ffprobe, "-v", "error", "-protocol_whitelist", PROTOCOL_WHITELIST,
         "http://127.0.0.1:9/x.mp4"]
    )  # fmt: skip
    if refused.returncode == 0 or "not on whitelist" not in refused.stderr:
        return fail(what, "this ffprobe does not enforce -protocol_whitelist: use ffmpeg >= 4")
    return ok(
        f"{' / '.join(versions)}: H.264 encode, probe, protocol whitelist {PROTOCOL_WHITELIST}"
    )


def _lock_version(root: Path) -> str | None:
    try:
        lock = json.loads((root / "package-lock.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    entry = lock.get("packages", {}).get("node_modules/azurite", {})
    version = entry.get("version") if isinstance(entry, dict) else None
    return version if isinstance(version, str) else None


def check_azurite(
    root: Path = REPO_ROOT, which: Callable[[str], str | None] = shutil.which
) -> CheckResult:
    """Node present, and Azurite installed in node_modules at the lock file's version."""
    what = "Node + Azurite"
    node = which("node")
    if node is None:
        return fail(what, "node not on PATH: apt-get install nodejs npm, then npm ci")
    node_version = _first_line(_run([node, "--version"]).stdout) or "unknown"
    wanted = _lock_version(root)
    if wanted is None:
        return fail(what, f"no azurite entry in {root / 'package-lock.json'}: restore the file")
    try:
        installed = json.loads(
            (root / "node_modules" / "azurite" / "package.json").read_text(encoding="utf-8")
        ).get("version")
    except (OSError, ValueError):
        installed = None
    launcher = root / "node_modules" / ".bin" / "azurite"
    if installed is None or not launcher.exists():
        return fail(what, f"Azurite {wanted} not installed: npm ci (in {root})")
    if installed != wanted:
        return fail(what, f"Azurite {installed} installed, the lock file says {wanted}: npm ci")
    return ok(f"Node {node_version}, Azurite {installed} (package-lock.json) in node_modules")


def check_disk(
    directory: Path | None = None,
    need_bytes: int = MIN_FREE_BYTES,
    usage: Callable[[str], tuple[int, int, int]] = shutil.disk_usage,
) -> CheckResult:
    """Free space where runs stage media and frames (the temp dir)."""
    where = Path(directory or tempfile.gettempdir())
    free = usage(str(where))[2]
    what = f"free disk in {where}: {free / 1024**3:.1f} GiB"
    if free < need_bytes:
        return fail(what, f"needs {need_bytes / 1024**3:.0f} GiB; free space or set TMPDIR")
    return ok(what)


def check_default_model(environ: Mapping[str, str] | None = None) -> CheckResult:
    """Where the default model's weights come from offline (or that they are random)."""
    from batchctl.contracts import RunOptions

    environ = os.environ if environ is None else environ
    model = RunOptions().model
    weights_dir = environ.get(WEIGHTS_DIR_ENV)
    if weights_dir:
        path = Path(weights_dir) / f"{model}.weights.h5"
        if path.is_file():
            return ok(f"default model {model}: weights {path}")
        where = f"{path} not found"
    else:
        where = f"{WEIGHTS_DIR_ENV} not set"
    # Not a failure: runs work, and every report says the weights were random.
    return ok(
        f"default model {model}: RANDOM weights offline ({where}; features are not "
        f"pretrained; python -m worker --bake-weights {model} --weights-dir DIR where the "
        "network is reachable, or --model Name@FILE.weights.h5)"
    )


def probe_description() -> str:
    return (
        f"probe: 1-item local run (generated 1 s video, features task keyframe path, "
        f"{PROBE_MODEL} at {PROBE_FRAME_SIZE}x{PROBE_FRAME_SIZE}, 1 node, own Azurite)"
    )


def check_local_probe(
    workdir: Path, timeout_s: float = PROBE_TIMEOUT_S, runner: Runner = subprocess.run
) -> CheckResult:
    """A real ``batchctl run`` of one generated video, in a child process."""
    what = probe_description()
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        return skip(what, "no ffmpeg (see the ffmpeg line)")
    video = workdir / "probe.mp4"
    if not video.is_file():
        try:
            make_probe_video(video, ffmpeg)
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            return skip(what, f"no test video: {error}")
    manifest = workdir / "probe.csv"
    manifest.write_text(f"id,video\nprobe,{video.name}\n", encoding="utf-8")
    command = [
        sys.executable, "-m", "batchctl", "run", str(manifest),
        "--nodes", "1", "--json", "--out", str(workdir / "out"),
        "--model", PROBE_MODEL, "--frame-size", PROBE_FRAME_SIZE, "--fps", "1",
    ]  # fmt: skip
    environ = {k: v for k, v in os.environ.items() if k not in _STORAGE_VARIABLES}
    started = time.monotonic()
    try:
        done = runner(
            command, capture_output=True, text=True, timeout=timeout_s, env=environ, check=False
        )
    except subprocess.TimeoutExpired:
        return fail(what, f"no answer in {timeout_s:.0f} s: run it yourself to see where it hangs")
    took = time.monotonic() - started
    answer = _last_json(done.stdout)
    if done.returncode == 0 and answer.get("succeeded") == 1:
        return ok(f"{what}: succeeded in {took:.0f} s")
    problem = answer.get("error") or _last_line(done.stderr) or f"exit {done.returncode}"
    return fail(
        what,
        f"{problem} (exit {done.returncode}); rerun: batchctl run MANIFEST --nodes 1 "
        f"--model {PROBE_MODEL} --frame-size {PROBE_FRAME_SIZE}",
    )


def _last_json(stdout: str) -> dict[str, object]:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def local_checks(workdir: Path, *, probe: bool = True) -> list[Callable[[], CheckResult]]:
    """The local checks in the order they print; the probe last (it takes the longest)."""
    checks: list[Callable[[], CheckResult]] = [
        check_python_modules,
        lambda: check_ffmpeg(workdir),
        check_azurite,
        check_disk,
        check_default_model,
    ]
    if probe:
        checks.append(lambda: check_local_probe(workdir))
    else:
        checks.append(lambda: skip(probe_description(), "--no-probe"))
    return checks
