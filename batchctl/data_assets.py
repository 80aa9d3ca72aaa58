"""A completed run's merged dataset as a versioned Azure ML data asset (``--register-output``).

After the merge (batchctl.merge), the run's ``{run_id}/merged/`` folder in the outputs
container is registered as a new version of the data asset the user named, of type
``uri_folder``, its description naming the run, the model and the manifest, so that a later
AML job takes it as ``azureml:NAME:VERSION``. A backend that can register (the AML backend
on azure-ai-ml: ``DataAssetRegistrar``) is asked to; the local backend cannot, and the same
record is written with ``registered: false``: what would have been registered, and a note
that says so.

Either way the record lands beside the merged output (:func:`record_blob_name`), which is
where the report reads it and what makes a retried activity register nothing twice: a
record of this run and name that says registered is returned as it is.

No Azure SDK is imported here: the backend's gateway builds the SDK's entity.
"""

from __future__ import annotations

import logging
from typing import Final

from azure.core.exceptions import ResourceNotFoundError
from pydantic import ValidationError

from batchctl.compute.base import (
    TAG_CREATED_BY,
    TAG_RUN_ID,
    DataAssetRegistrar,
    DataAssetRequest,
    run_tags,
)
from batchctl.contracts import DataAssetRegistration, MergeSummary, RunState
from batchctl.services import Services
from batchctl.storage import BlobStore

log = logging.getLogger(__name__)

TAG_MODEL: Final = "batchctl-model"
TAG_MANIFEST: Final = "batchctl-manifest"
# An AML asset description is shown in the studio's list: a manifest URL may be long.
MAX_DESCRIPTION: Final = 1000
__all__ = [
    "TAG_CREATED_BY",
    "TAG_MANIFEST",
    "TAG_MODEL",
    "TAG_RUN_ID",
    "DataAssetRegistrar",
    "DataAssetRequest",
    "asset_request",
    "read_registration",
    "record_blob_name",
    "register_merged_output",
]


def record_blob_name(run_id: str) -> str:
    """The outputs-container blob that records the run's data asset, beside ``merged/``.

    Beside, not inside: the asset is the ``merged/`` folder, and a reader of the folder
    must find Parquet parts and the merge's own manifest only.
    """
    return f"{run_id}/merged_data_asset.json"


def asset_request(
    name: str, state: RunState, merged: MergeSummary, folder_url: str
) -> DataAssetRequest:
    """The registration of ``merged`` (at ``folder_url``) as asset ``name``: pure."""
    options = state.request.options
    manifest = state.request.manifest_label or state.request.manifest
    description = (
        f"batchctl run {state.run_id}: features of {merged.items} items ({merged.rows} rows"
        f"{f', dim {merged.dim}' if merged.dim else ''}) by model {options.model} "
        f"(task {options.task}) from manifest {manifest}"
    )
    if len(description) > MAX_DESCRIPTION:
        description = description[: MAX_DESCRIPTION - 3] + "..."
    tags = {
        **run_tags(state.run_id),
        TAG_MODEL: options.model[:256],
        TAG_MANIFEST: manifest[:256],
    }
    return DataAssetRequest(name=name, path=folder_url, description=description, tags=tags)


def read_registration(
    store: BlobStore, container: str, run_id: str
) -> DataAssetRegistration | None:
    """The run's data asset record, or None when it has none (or an unreadable one)."""
    try:
        raw = store.download_bytes(container, record_blob_name(run_id))
    except ResourceNotFoundError:
        return None
    try:
        return DataAssetRegistration.model_validate_json(raw)
    except ValidationError as error:
        log.warning("the data asset record of run %s is unreadable: %s", run_id, error)
        return None


def register_merged_output(
    services: Services, state: RunState, merged: MergeSummary
) -> DataAssetRegistration:
    """Register the run's merged dataset as the asset its options name (idempotent).

    The AML backend registers it and the record says which version; the local backend
    registers nothing and the record says what would have been registered.
    """
    name = state.request.options.register_output
    if name is None:
        raise ValueError(f"run {state.run_id} asked for no data asset (--register-output)")
    if merged.run_id != state.run_id:
        raise ValueError(f"the merge of run {merged.run_id} is not run {state.run_id}'s")
    settings = services.settings
    container = settings.outputs_container
    backend = services.backend
    registrar = backend if isinstance(backend, DataAssetRegistrar) else None
    earlier = read_registration(services.store, container, state.run_id)
    if earlier is not None and earlier.name == name and (earlier.registered or not registrar):
        return earlier  # a retried activity: registered (or written) already
    if registrar is None and backend.kind != "local":
        raise TypeError(f"the {backend.kind} backend cannot register data assets")
    request = asset_request(
        name, state, merged, services.store.url(container, merged.prefix.rstrip("/") + "/")
    )
    version = registrar.register_data_asset(request) if registrar is not None else None
    record = DataAssetRegistration(
        run_id=state.run_id,
        name=request.name,
        version=version,
        path=request.path,
        description=request.description,
        tags=request.tags,
        registered=registrar is not None,
        backend=backend.kind,
        record_blob=record_blob_name(state.run_id),
    )
    services.store.upload_bytes(
        container,
        record.record_blob,
        record.model_dump_json(indent=2),
        content_type="application/json",
    )
    return record
