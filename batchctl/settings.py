"""Process settings: one pydantic-settings class per process kind, loaded by a cached getter.

Nothing here is instantiated at import: an import-time error in a Functions app hides every
function, so a missing setting must fail when a function first runs, naming the variable.
Required fields have no defaults on purpose.

Storage is reached in one of two ways:
- ``managed_identity`` (Azure): account URLs + ``DefaultAzureCredential``; no key anywhere.
- ``azurite`` (local mode and tests): Azurite's published development account, whose key is
  public and documented, so it is a constant here rather than a setting.
"""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# Azurite's well-known development account (published in Azurite's and Azure's docs).
AZURITE_ACCOUNT_NAME = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

StorageAuth = Literal["managed_identity", "azurite"]

ENV_PREFIX = "BATCHCTL_"


class StorageSettings(BaseSettings):
    """Where the run's queues, blobs and ledger live, and how to authenticate."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True)

    storage_auth: StorageAuth
    blob_url: str = Field(description="e.g. https://acct.blob.core.windows.net")
    queue_url: str = Field(description="e.g. https://acct.queue.core.windows.net")
    table_url: str = Field(description="e.g. https://acct.table.core.windows.net")
    # Containers and the ledger table. Defaults match infra/ so a deployment sets nothing.
    manifests_container: str = "manifests"
    media_container: str = "media"
    runs_container: str = "runs"
    outputs_container: str = "outputs"
    ledger_table: str = "ledger"

    @field_validator("blob_url", "queue_url", "table_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")


class ControllerSettings(StorageSettings):
    """The Functions app (and the local driver standing in for it)."""

    compute_backend: Literal["aml", "aml_v1", "local"]
    # Sources a manifest may name: "account/container" pairs ("account/*" for any container).
    allowed_sources: list[str] = Field(default_factory=list)
    # Local mode only: manifests may name files under this directory.
    local_media_root: str | None = None
    chunk_size: int = Field(default=2000, ge=1, le=100_000)
    # Local backend only: worker processes ("nodes") per run, and where their logs go.
    local_nodes: int = Field(default=2, ge=1, le=64)
    local_log_dir: str | None = None


class WorkerSettings(StorageSettings):
    """A node worker process. The run and its options arrive with each message."""

    run_id: str
    node_name: str = "node"
    weights_dir: str | None = None


@functools.cache
def get_controller_settings() -> ControllerSettings:
    return ControllerSettings()  # fields come from the environment


@functools.cache
def get_worker_settings() -> WorkerSettings:
    return WorkerSettings()


def azurite_environment(blob_url: str, queue_url: str, table_url: str) -> dict[str, str]:
    """The environment variables that point a process at an Azurite instance."""
    return {
        f"{ENV_PREFIX}STORAGE_AUTH": "azurite",
        f"{ENV_PREFIX}BLOB_URL": blob_url,
        f"{ENV_PREFIX}QUEUE_URL": queue_url,
        f"{ENV_PREFIX}TABLE_URL": table_url,
    }
