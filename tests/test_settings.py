"""Settings load from the environment, name what is missing, and never load at import."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from batchctl import settings as settings_module
from batchctl.functions.app_services import app_services
from batchctl.settings import ControllerSettings, get_worker_settings


@pytest.fixture(autouse=True)
def _fresh_cache():
    app_services.cache_clear()
    get_worker_settings.cache_clear()
    yield
    app_services.cache_clear()
    get_worker_settings.cache_clear()


def test_missing_required_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BATCHCTL_STORAGE_AUTH", "BATCHCTL_BLOB_URL", "BATCHCTL_COMPUTE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValidationError) as caught:
        app_services()  # the Functions app's composition root, at its first call
    missing = {error["loc"][0] for error in caught.value.errors() if error["type"] == "missing"}
    assert {"storage_auth", "blob_url", "compute_backend"} <= missing


def test_the_app_builds_its_services_once_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    environment = settings_module.azurite_environment(
        "http://127.0.0.1:1/devstoreaccount1/",
        "http://127.0.0.1:2/devstoreaccount1",
        "http://127.0.0.1:3/devstoreaccount1",
    )
    for name, value in {**environment, "BATCHCTL_COMPUTE_BACKEND": "local"}.items():
        monkeypatch.setenv(name, value)
    services = app_services()
    loaded = services.settings
    assert isinstance(loaded, ControllerSettings)
    assert loaded.blob_url == "http://127.0.0.1:1/devstoreaccount1"  # trailing slash trimmed
    assert loaded.storage_auth == "azurite"
    assert app_services() is services  # built once per process


def test_bad_url_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHCTL_STORAGE_AUTH", "managed_identity")
    monkeypatch.setenv("BATCHCTL_BLOB_URL", "ftp://nope")
    with pytest.raises(ValidationError, match="blob_url"):
        ControllerSettings()


def test_importing_the_package_reads_no_settings() -> None:
    # A clean interpreter with no BATCHCTL_* variables imports every settings user happily.
    code = (
        "import batchctl.settings, batchctl.storage, batchctl.contracts, batchctl.cli, "
        "batchctl.services, batchctl.functions.app_services, activities"
    )
    env = {"PATH": "/usr/bin:/bin"}
    completed = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
