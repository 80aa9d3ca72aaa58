"""local.settings.json.example lists every setting the app reads, and nothing else.

`func start` reads it; the README points there. The host's own settings are named here;
every ``BATCHCTL_*`` one must be a field of the controller's settings and every field must
be there, and the values must load (the settings class fails loudly on a bad one).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from batchctl.settings import ENV_PREFIX, ControllerSettings, default_local_nodes

EXAMPLE = Path(__file__).resolve().parent.parent / "local.settings.json.example"
# What the Functions host and its Python worker read: the language, the storage of the
# Durable task hub (and of the blob trigger's connection), and the worker's thread pool
# (activities block on storage and AML calls; infra/ sets the same).
HOST_SETTINGS = {
    "FUNCTIONS_WORKER_RUNTIME",
    "AzureWebJobsStorage",
    "PYTHON_THREADPOOL_THREAD_COUNT",
}


def _values() -> dict[str, str]:
    values = json.loads(EXAMPLE.read_text())["Values"]
    assert all(isinstance(v, str) for v in values.values()), "Values must all be strings"
    return dict(values)


def test_every_controller_setting_and_nothing_else() -> None:
    values = _values()
    ours = {name for name in values if name.startswith(ENV_PREFIX)}
    fields = {f"{ENV_PREFIX}{name.upper()}" for name in ControllerSettings.model_fields}
    assert ours == fields
    assert set(values) - ours == HOST_SETTINGS


def test_the_values_load_as_the_app_loads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in _values().items():
        monkeypatch.setenv(name, value)
    settings = ControllerSettings()
    assert settings.compute_backend == "local" and settings.storage_auth == "azurite"
    assert settings.blob_url.endswith(":10000/devstoreaccount1")
    # The optional ones show their defaults.
    defaults = ControllerSettings.model_fields
    for name in ("manifests_container", "runs_container", "chunk_size"):
        assert getattr(settings, name) == defaults[name].default, name
    assert settings.local_nodes == int(_values()["BATCHCTL_LOCAL_NODES"])
    assert settings.allowed_sources == []
    assert not settings.local_media_root and not settings.local_log_dir


def test_a_local_run_gets_one_node_per_four_cores_and_at_least_one() -> None:
    assert [default_local_nodes(cores) for cores in (1, 2, 3, 4, 7, 8, 16, 64, 1000)] == [
        1, 1, 1, 1, 1, 2, 4, 16, 64,
    ]  # fmt: skip
    # The machine's own count is its affinity (a container's cpuset), not every core.
    assert default_local_nodes() == max(1, min(64, len(os.sched_getaffinity(0)) // 4))
