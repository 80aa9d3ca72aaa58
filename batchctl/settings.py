"""Process settings: one pydantic-settings class per process kind, read once at start-up.

The controller's are read by its composition root (batchctl.functions.app_services for the
Functions app, batchctl.local.session for local sessions); the worker's by its entry point.

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
import os
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


LOCAL_NODES_MAX = 64
# Cores a local "node" gets by default. One worker process already keeps several cores busy:
# its items decode in ffmpeg processes of their own while TensorFlow infers on its own
# threads. On 2 cores a second process bought no throughput (96 clips: 25.3 s with two,
# 25.7 s with one) and cost a second TensorFlow import and model build, 4 CPU-seconds a
# run (bench/peers.py measures a run's CPU).
CORES_PER_LOCAL_NODE = 4


def usable_cores() -> int:
    """The cores this process may run on (its affinity, which a container's cpuset narrows)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def default_local_nodes(cores: int | None = None) -> int:
    """Worker processes a local run gets unless told: one per :data:`CORES_PER_LOCAL_NODE`
    cores of this machine (``cores``; default: :func:`usable_cores`), at least one (pure
    given ``cores``)."""
    available = usable_cores() if cores is None else cores
    return max(1, min(LOCAL_NODES_MAX, available // CORES_PER_LOCAL_NODE))


# Items a local node works on at once, per core it has (see local_concurrency).
LOCAL_ITEMS_PER_CORE = 4
LOCAL_CONCURRENCY_MAX = 16


def local_concurrency(nodes: int, cores: int | None = None) -> int:
    """Items each of ``nodes`` local worker processes works on at once: 4 per core it gets
    (``cores``, default :func:`usable_cores`, shared out), at least the nodes' default of 3,
    at most 16 (pure given ``cores``). A local node has no GPU: its items' downloads, ffmpeg
    decodes and storage round trips overlap TensorFlow's inference on the same cores, and
    the node's default of 3 left them idle (240 clips on 2 cores, one node: 45.7 s with 3
    at once, 39.9 s with 6, 38.7 s with 10)."""
    available = usable_cores() if cores is None else cores
    per_node = max(1, available // max(1, nodes))
    default = int(WorkerSettings.model_fields["concurrency"].default)
    return max(default, min(LOCAL_CONCURRENCY_MAX, LOCAL_ITEMS_PER_CORE * per_node))


class ControllerSettings(StorageSettings):
    """The Functions app (and the local driver standing in for it)."""

    compute_backend: Literal["aml", "aml_v1", "local"]
    # Sources a manifest may name: "account/container" pairs ("account/*" for any container).
    allowed_sources: list[str] = Field(default_factory=list)
    # Local mode only: manifests may name files under this directory.
    local_media_root: str | None = None
    chunk_size: int = Field(default=2000, ge=1, le=100_000)
    # Local backend only: worker processes ("nodes") per run, and where their logs go.
    # (A lambda: pydantic would pass a one-parameter factory the validated data as ``cores``.)
    local_nodes: int = Field(
        default_factory=lambda: default_local_nodes(),  # noqa: PLW0108
        ge=1,
        le=LOCAL_NODES_MAX,
    )
    local_log_dir: str | None = None


class WorkerSettings(StorageSettings):
    """A node worker process. The run and its options arrive with each message.

    Everything below ``weights_dir`` is optional tuning with defaults fit for a GPU node; the
    compute backends set only the storage locations, the run id and the run's options.
    """

    run_id: str
    node_name: str = "node"
    # Model weights baked into the node image (``<weights_dir>/<Model>.weights.h5``).
    weights_dir: str | None = None
    # Local mode only: the controller process that started this worker. When it dies the
    # worker stops within seconds (node_image/worker/controller_watch.py); in Azure, None.
    controller_pid: int | None = Field(default=None, ge=1)
    # Local mode only: the folder whose videos the run's manifest may name (the same
    # variable as the controller's); the worker copies them in place of a download
    # (batchctl/storage/items.py). In Azure, None: a worker reads blobs only.
    local_media_root: str | None = None
    # batchctl run only: the run's outputs folder, where the worker writes each output it
    # uploads as well, so the copy-out has none left to download (LocalOutputCopies).
    local_outputs_dir: str | None = None
    # Whether each success is noted in the outputs index (--skip-existing reads it in later
    # runs). False for storage no later run reads: `batchctl run`'s private Azurite, which
    # is removed at the run's end, index entries unread.
    index_outputs: bool = True
    # The job's NodeSpec as JSON (set by the compute backends when they start the job): the
    # task, its settings, timeouts, attempts, idle exit and items per message. Messages carry
    # items only, so this is the one way a node learns how to process them.
    task_options: str | None = None
    # Worker processes on this node, one per GPU (None or 1: this process does the work).
    processes_per_node: int | None = Field(default=None, ge=1, le=16)
    # Items worked on at once: downloads and decodes of the next videos overlap inference.
    concurrency: int = Field(default=3, ge=1, le=64)
    # Messages received ahead of a free slot, so the next item never waits on the queue.
    prefetch: int = Field(default=1, ge=0, le=32)
    # After SIGTERM (preemption), how long in-flight items may run before their messages are
    # released for another node. AML low-priority nodes get about 30 s of notice.
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    # Longest wait between two receives while the queue is empty.
    poll_interval_s: float = Field(default=1.0, gt=0, le=60)
    # A retryable failure's message reappears after this delay, doubled on each attempt.
    retry_delay_s: float = Field(default=5.0, ge=0, le=3600)
    # Limits on untrusted media: a video over any of them fails permanently.
    max_video_bytes: int = Field(default=8 * 1024**3, ge=1)
    max_duration_s: float = Field(default=4 * 3600.0, gt=0)
    max_width: int = Field(default=7680, ge=16)
    max_height: int = Field(default=7680, ge=16)
    max_pixels: int = Field(default=7680 * 4320, ge=256)
    decode_timeout_s: float = Field(default=900.0, gt=0)
    # Threads per ffmpeg decode: several videos decode at once, one thread each uses the
    # cores best (see node_image/worker/media.py).
    decode_threads: int = Field(default=1, ge=1, le=64)
    # Where downloads go (default: the system temp directory).
    work_dir: str | None = None
    # Disk kept for long videos whose segments this node may still run (one download per
    # node per video: node_image/worker/sourcecache.py); 0 downloads every segment's source.
    source_cache_bytes: int = Field(default=32 * 1024**3, ge=0)
    # float16 compute on GPUs (features are returned as float32 either way).
    mixed_precision: bool = False
    log_level: str = "INFO"
    # "json": one object per line for log pipelines; "text" for people. Both name run and item.
    log_format: Literal["text", "json"] = "text"


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
