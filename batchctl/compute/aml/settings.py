"""What the AML backend is configured with, and what every node it starts is launched with.

``AmlSettings`` is read from ``BATCHCTL_AML_*`` on first use (never at import: an
import-time error in a Functions app hides every function). ``NodeLaunch`` is the node's
side: where storage is, which run, how to work, as environment variables and never a key.
"""

from __future__ import annotations

import functools

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from batchctl.compute.base import TASK_OPTIONS_ENV
from batchctl.contracts import RunOptions
from batchctl.planning import (
    DEFAULT_HEADROOM,
    DEFAULT_MAX_CLUSTERS,
    DEFAULT_SCALE_DOWN_S,
    DEFAULT_STARTUP_S,
)
from batchctl.settings import ENV_PREFIX, StorageAuth, StorageSettings

__all__ = ["AmlSettings", "NodeLaunch", "get_aml_settings"]


class AmlSettings(BaseSettings):
    """Where the AML backend creates compute and how it sizes it (``BATCHCTL_AML_*``).

    Required fields have no defaults, so a missing one fails when the backend is first
    built, naming the variable. No secret: the controller signs in with its managed identity
    (``DefaultAzureCredential``), and the nodes reach storage with the user-assigned identity
    named here.
    """

    model_config = SettingsConfigDict(env_prefix=f"{ENV_PREFIX}AML_", extra="ignore", frozen=True)

    subscription_id: str
    resource_group: str
    workspace_name: str
    node_image: str = Field(min_length=1, description="e.g. myacr.azurecr.io/batchctl-node:1")
    identity_resource_id: str | None = Field(
        default=None, description="ARM id of the user-assigned identity the clusters carry"
    )
    identity_client_id: str | None = Field(
        default=None, description="its client id, for DefaultAzureCredential on the nodes"
    )
    idle_time_before_scale_down_s: int = Field(default=int(DEFAULT_SCALE_DOWN_S), ge=0)
    experiment_name: str = "batchctl"
    wait: bool = Field(default=True, description="block until create/cancel/delete finish")
    # Long operations (cluster create/resize/delete, job cancel) run for every cluster at
    # once: all are started, then all are awaited, at most this many at a time, so an
    # activity takes about as long as the slowest cluster, not the sum of all of them.
    parallel_operations: int = Field(default=16, ge=1, le=64)
    # How long one listing of a run's jobs waits out ARM throttling (429, 503, with their
    # Retry-After; SDK v1's run history listing likewise) before giving up (throttling.py).
    # About one default poll interval: a poll that gives up reports its jobs unknown and
    # the next poll tries again.
    arm_retry_budget_s: float = Field(default=30.0, ge=0, le=300)
    # Sizing: what planning needs beyond the run's options.
    sec_per_item: float = Field(default=20.0, gt=0, description="one item on one node, measured")
    startup_s: float = Field(default=DEFAULT_STARTUP_S, ge=0)
    headroom: float = Field(default=DEFAULT_HEADROOM, ge=0, lt=1)
    max_clusters: int = Field(default=DEFAULT_MAX_CLUSTERS, ge=1, le=999)
    price_per_hour: float | None = Field(default=None, ge=0)


@functools.cache
def get_aml_settings() -> AmlSettings:
    """The AML settings from the environment (loaded on first use, never at import)."""
    return AmlSettings()  # fields come from the environment (BATCHCTL_AML_*)


class NodeLaunch(BaseModel):
    """What every node of a run is started with: where storage is, which run, how to work.

    Only locations and options: never a key. In Azure the nodes reach storage with the
    compute's managed identity (``identity_client_id`` selects a user-assigned one).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str
    storage_auth: StorageAuth = "managed_identity"
    blob_url: str
    queue_url: str
    table_url: str
    manifests_container: str = "manifests"
    media_container: str = "media"
    runs_container: str = "runs"
    outputs_container: str = "outputs"
    ledger_table: str = "ledger"
    options: RunOptions = Field(default_factory=RunOptions)
    identity_client_id: str | None = None
    command: tuple[str, ...] = ("python", "-m", "worker")
    timeout_s: int | None = Field(default=None, gt=0, description="hard limit on one job")

    @classmethod
    def from_settings(
        cls,
        settings: StorageSettings,
        run_id: str,
        options: RunOptions,
        *,
        identity_client_id: str | None = None,
        timeout_s: int | None = None,
    ) -> NodeLaunch:
        """The launch for a run from the controller's own storage settings."""
        return cls(
            run_id=run_id,
            storage_auth=settings.storage_auth,
            blob_url=settings.blob_url,
            queue_url=settings.queue_url,
            table_url=settings.table_url,
            manifests_container=settings.manifests_container,
            media_container=settings.media_container,
            runs_container=settings.runs_container,
            outputs_container=settings.outputs_container,
            ledger_table=settings.ledger_table,
            options=options,
            identity_client_id=identity_client_id,
            timeout_s=timeout_s,
        )

    def environment(self) -> dict[str, str]:
        """The environment variables a node's worker reads (WorkerSettings + options)."""
        env = {
            f"{ENV_PREFIX}STORAGE_AUTH": self.storage_auth,
            f"{ENV_PREFIX}BLOB_URL": self.blob_url,
            f"{ENV_PREFIX}QUEUE_URL": self.queue_url,
            f"{ENV_PREFIX}TABLE_URL": self.table_url,
            f"{ENV_PREFIX}MANIFESTS_CONTAINER": self.manifests_container,
            f"{ENV_PREFIX}MEDIA_CONTAINER": self.media_container,
            f"{ENV_PREFIX}RUNS_CONTAINER": self.runs_container,
            f"{ENV_PREFIX}OUTPUTS_CONTAINER": self.outputs_container,
            f"{ENV_PREFIX}LEDGER_TABLE": self.ledger_table,
            f"{ENV_PREFIX}RUN_ID": self.run_id,
            # The job's node spec, the one way a node learns how to process items (idle
            # exit included): the queue messages carry items only.
            TASK_OPTIONS_ENV: self.options.node_spec().model_dump_json(),
        }
        if self.identity_client_id:
            # DefaultAzureCredential's ManagedIdentityCredential reads AZURE_CLIENT_ID to pick
            # the user-assigned identity when a node has more than one.
            env["AZURE_CLIENT_ID"] = self.identity_client_id
        return env
