"""Validating a run's manifest and claiming its id (the validate activity)."""

from __future__ import annotations

import logging
from pathlib import Path

from azure.core.exceptions import ResourceExistsError

from batchctl.contracts import (
    ManifestSummary,
    RunRequest,
)
from batchctl.controller.names import CLAIM_NAME
from batchctl.manifest import (
    SourcePolicy,
    prefixes_from_accounts,
    read_chunk,
    validate_manifest_to_blobs,
)
from batchctl.services import Services
from batchctl.settings import ControllerSettings
from batchctl.storage import BlobStore
from batchctl.storage.ledger import LOCAL_SHARDS, SHARDS, shards_for_fleet

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


def source_policy(settings: ControllerSettings, store: BlobStore) -> SourcePolicy:
    """The run's allowlist: its own media container, the configured accounts, and local
    files in local mode (the rules are batchctl.sources', which every worker applies too).

    A local file stays a ``file://`` source: local workers read it in place, under the same
    root (batchctl/storage/items.py). Only local compute has workers that can: a root set
    for another backend allows no local file, so such rows are refused here, by row, rather
    than failing on their nodes."""
    own_media = store.url(settings.media_container, "")
    root = settings.local_media_root if settings.compute_backend == "local" else None
    return SourcePolicy(
        allowed_prefixes=(own_media, *prefixes_from_accounts(settings.allowed_sources)),
        local_root=Path(root) if root else None,
    )


def manifest_location(manifest: str, settings: ControllerSettings) -> tuple[str, str]:
    """(container, blob name) of a manifest given as 'container/name', 'name' or a blob URL."""
    if manifest.startswith(("https://", "http://")):
        prefix = settings.blob_url + "/"
        if not manifest.startswith(prefix):
            raise ValueError(f"manifest URL {manifest!r} is not in this app's storage account")
        manifest = manifest[len(prefix) :]
    container, _, name = manifest.partition("/")
    if not name:
        return settings.manifests_container, container
    return container, name


class RunIdTakenError(ValueError):
    """A run id that another run already holds in this storage (bad input: pick another)."""


def check_run_id_free(services: Services, run_id: str) -> None:
    """RunIdTakenError when ``run_id`` is claimed in this storage already.

    For starters that can refuse before any orchestration begins (the local session); the
    orchestrator's own claim (``claim_run_id``) is what protects a run wherever it starts.
    """
    if services.store.exists(services.settings.runs_container, f"{run_id}/{CLAIM_NAME}"):
        raise RunIdTakenError(
            f"run id {run_id} already belongs to another run in this storage "
            f"({services.settings.blob_url}); choose another --run-id"
        )


def claim_run_id(services: Services, request: RunRequest) -> bool:
    """Claim the run id in storage for this run; False when another run holds it.

    The claim is written only if absent, with what the orchestrator put in the request (the
    run's start): a retried activity finds its own claim and goes on, a second run under the
    same id finds another's and is refused before it writes a chunk, a message or a record.
    """
    if request.claim is None:
        return True
    runs, name = services.settings.runs_container, f"{request.run_id}/{CLAIM_NAME}"
    try:
        services.store.upload_bytes(runs, name, request.claim, overwrite=False)
    except ResourceExistsError:
        return services.store.download_bytes(runs, name).decode("utf-8") == request.claim
    return True


def validate_manifest(services: Services, request: RunRequest) -> ManifestSummary:
    settings = services.settings
    store = services.store
    if not claim_run_id(services, request):
        return ManifestSummary(
            run_id=request.run_id,
            manifest=request.manifest,
            rows=0,
            valid=0,
            invalid=0,
            chunk_count=0,
            run_id_taken=True,
            fatal=(
                f"run id {request.run_id} already belongs to another run in this storage; "
                "start this one with a new run id (nothing was changed)"
            ),
        )
    # The run's shard count, chosen once from its fleet before its first record (a
    # retried validation keeps the first): the enqueue packs messages by it, nodes record by it.
    fleet = fleet_nodes(settings, request.options.max_nodes)
    services.ledger.fix_shard_count(request.run_id, run_shards(settings, fleet))
    container, name = manifest_location(request.manifest, settings)
    summary = validate_manifest_to_blobs(
        store,
        run_id=request.run_id,
        manifest_name=name,
        container=container,
        policy=source_policy(settings, store),
        chunk_size=settings.chunk_size,
        segment_s=request.options.segment_seconds,
    )
    summary = summary.model_copy(update={"fleet_nodes": fleet})
    if request.options.skip_existing and summary.valid and not summary.fatal:
        summary = summary.model_copy(update={"skipped": _skip_existing(services, request, summary)})
    return summary


def run_shards(settings: ControllerSettings, fleet: int) -> int:
    """The ledger shards of a run on ``fleet`` nodes (pure): a local session's start from
    :data:`LOCAL_SHARDS`, since its monitor reads a counter per shard at every poll."""
    local = settings.compute_backend == "local"
    return shards_for_fleet(fleet, LOCAL_SHARDS if local else SHARDS)


def fleet_nodes(settings: ControllerSettings, max_nodes: int) -> int:
    """The most nodes a run can get (pure): a local session has its node count and no more,
    whatever the run's ``max_nodes`` says (100 by default), so a local run's messages are
    packed for the nodes that will really take them: 240 items on one local node go 8 a
    message, not one, with an eighth of the queue traffic and ledger transactions."""
    if settings.compute_backend == "local":
        return max(1, min(max_nodes, settings.local_nodes))
    return max_nodes


def _skip_existing(services: Services, request: RunRequest, summary: ManifestSummary) -> int:
    """Record as skipped the items an earlier run did already and take them out of their
    chunks, so they are never enqueued. Idempotent: a retried validation writes the same
    chunks again and finds the same records."""
    from batchctl.outputs_index import fingerprint
    from batchctl.skipping import skipped_results

    task_fingerprint = fingerprint(request.options.task_settings(), request.options.image)
    skipped = 0
    for chunk in summary.chunks:
        items = read_chunk(services.store, chunk)
        done = list(skipped_results(services, request.run_id, items, task_fingerprint))
        if not done:
            continue
        services.ledger.record_absent(done)
        ids = {result.item_id for result in done}
        kept = "".join(item.model_dump_json() + "\n" for item in items if item.item_id not in ids)
        services.store.upload_bytes(services.settings.runs_container, chunk, kept)
        skipped += len(done)
    if skipped:
        log.info("%d items skipped: their outputs exist from earlier runs", skipped)
    return skipped
