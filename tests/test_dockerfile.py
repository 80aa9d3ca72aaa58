"""The node image's Dockerfile, checked without a Docker engine (none runs here).

Every path it copies exists in the build context the deploy hook stages, the pins it installs
are the versions the tests ran, its CUDA base matches the TensorFlow build it pins, it runs as
a non-root user, and its entry point (``python -m worker``) starts in this environment.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from batchctl.contracts import RunOptions

ENTRY = ["python", "-m", "worker"]


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    parsed = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        parsed.append((keyword.upper(), rest.strip()))
    return parsed


@pytest.fixture(scope="module")
def dockerfile(repo_root: Path) -> list[tuple[str, str]]:
    return _instructions(repo_root / "node_image" / "Dockerfile")


@pytest.fixture(scope="module")
def staged_sources(repo_root: Path) -> tuple[str, ...]:
    spec = importlib.util.spec_from_file_location(
        "node_image_hook", repo_root / "infra" / "hooks" / "node_image.py"
    )
    assert spec is not None and spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(module.SOURCES)


@pytest.fixture(scope="module")
def pins(repo_root: Path) -> dict[str, str]:
    found: dict[str, str] = {}
    for raw in (repo_root / "node_image" / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned with ==: {line}"
            found[name.lower().replace("_", "-")] = version
    return found


def test_every_copy_source_exists_in_the_staged_build_context(
    dockerfile: list[tuple[str, str]], repo_root: Path, staged_sources: tuple[str, ...]
) -> None:
    copies = [args for keyword, args in dockerfile if keyword == "COPY"]
    assert copies
    for args in copies:
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        *sources, _target = parts
        for source in sources:
            assert (repo_root / source).exists(), f"COPY source {source} does not exist"
            top = source.split("/", 1)[0]
            assert top in staged_sources, f"{source} is not staged by infra/hooks/node_image.py"


def test_base_image_matches_the_pinned_tensorflow_gpu_build(
    dockerfile: list[tuple[str, str]], pins: dict[str, str]
) -> None:
    args = dict(arg.split("=", 1) for keyword, arg in dockerfile if keyword == "ARG" and "=" in arg)
    base = args["CUDA_IMAGE"]
    # One copy of cuDNN and the CUDA libraries: the wheels' (TensorFlow loads those); the
    # base is CUDA's -base image, never a -runtime or -cudnn one that would ship them again.
    assert re.fullmatch(r"nvidia/cuda:12\.5\.\d+-base-ubuntu24\.04", base), base
    assert "cudnn" not in base and "runtime" not in base
    assert dockerfile[0] == ("FROM", "${CUDA_IMAGE}") or any(
        keyword == "FROM" and "CUDA_IMAGE" in value for keyword, value in dockerfile
    )
    # TensorFlow 2.21's [and-cuda] extra: CUDA 12.5 libraries and cuDNN 9.3.
    assert pins["tensorflow"] == "2.21.0"
    assert pins["nvidia-cuda-runtime-cu12"].startswith("12.5.")
    assert pins["nvidia-cudnn-cu12"].startswith("9.3.")
    for library in ("cublas", "cufft", "curand", "cusolver", "cusparse", "nccl"):
        assert f"nvidia-{library}-cu12" in pins, f"{library} would be missing from the image"


def test_cudnn_ships_once(dockerfile: list[tuple[str, str]], pins: dict[str, str]) -> None:
    """No second cuDNN: not from the base image, not from apt, only the pinned wheel."""
    text = "\n".join(value for _, value in dockerfile).lower()
    cudnn_wheels = [name for name in pins if "cudnn" in name]
    assert cudnn_wheels == ["nvidia-cudnn-cu12"]
    assert "cudnn-runtime" not in text and "cudnn-devel" not in text
    assert "libcudnn" not in text  # no apt-installed cuDNN


def test_the_image_pins_what_the_tests_ran(pins: dict[str, str]) -> None:
    local = {
        "tensorflow": importlib.metadata.version("tensorflow-cpu"),
        "keras": importlib.metadata.version("keras"),
        "numpy": importlib.metadata.version("numpy"),
        "av": importlib.metadata.version("av"),
        "pydantic": importlib.metadata.version("pydantic"),
        "azure-storage-queue": importlib.metadata.version("azure-storage-queue"),
    }
    for name, version in local.items():
        assert pins[name] == version, f"{name}: image pins {pins[name]}, tests ran {version}"


def test_ffmpeg_non_root_user_weights_and_entry_point(dockerfile: list[tuple[str, str]]) -> None:
    runs = " ".join(args for keyword, args in dockerfile if keyword == "RUN")
    assert "ffmpeg" in runs
    assert "--bake-weights" in runs
    users = [args for keyword, args in dockerfile if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    last_user_at = max(i for i, (k, _) in enumerate(dockerfile) if k == "USER")
    assert all(k != "USER" for k, _ in dockerfile[last_user_at + 1 :])
    cmd = [args for keyword, args in dockerfile if keyword == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ENTRY
    env = " ".join(args for keyword, args in dockerfile if keyword == "ENV")
    workdir = [args for keyword, args in dockerfile if keyword == "WORKDIR"][-1]
    assert f"PYTHONPATH={workdir}" in env  # `python -m worker` from any working directory
    assert "BATCHCTL_WEIGHTS_DIR=" in env


def _worker_env(repo_root: Path) -> dict[str, str]:
    # The image's layout: the worker package on PYTHONPATH, no BATCHCTL_* settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHCTL_")}
    env["PYTHONPATH"] = str(repo_root / "node_image")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return env


def test_entry_point_starts_from_any_directory(repo_root: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "worker", "--help"],
        cwd=tmp_path,
        env=_worker_env(repo_root),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "--check" in completed.stdout


def test_entry_point_check_loads_tools_and_model(repo_root: Path, tmp_path: Path) -> None:
    env = _worker_env(repo_root)
    spec = RunOptions(model="MobileNetV3Small", frame_size=64).node_spec()
    env["BATCHCTL_TASK_OPTIONS"] = spec.model_dump_json()
    completed = subprocess.run(
        [sys.executable, "-m", "worker", "--check", "--weights-dir", str(tmp_path)],
        cwd=repo_root / "node_image",  # the image's WORKDIR layout
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    report = json.loads(completed.stdout)
    assert report["ok"] and set(report["tools"]) == {"ffmpeg", "ffprobe"}
    assert report["probe"]["pyav"] == importlib.metadata.version("av")
    assert report["model"]["model"] == "MobileNetV3Small"
    assert report["model"]["weights"].startswith("random-init") and not report["pretrained"]


def test_missing_settings_fail_loudly_by_name(repo_root: Path, tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "worker"],
        cwd=tmp_path,
        env=_worker_env(repo_root),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 2
    for name in ("BATCHCTL_RUN_ID", "BATCHCTL_STORAGE_AUTH", "BATCHCTL_BLOB_URL"):
        assert name in completed.stderr
