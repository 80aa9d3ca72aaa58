"""A completed run's merged Parquet output (the merge activity)."""

from __future__ import annotations

import logging

from azure.core.exceptions import ResourceNotFoundError

from batchctl.contracts import (
    DataAssetRegistration,
    MergeSummary,
    RunState,
)
from batchctl.manifest import (
    chunk_blob_name,
    read_chunk,
)
from batchctl.services import Services

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


def merge_outputs(services: Services, run_id: str) -> MergeSummary:
    """Merge the run's succeeded items' features into one Parquet dataset. Idempotent."""
    # Imported here: pyarrow and numpy come with the [app] extra, not the core library.
    from batchctl.merge import merge_run_outputs

    settings = services.settings
    return merge_run_outputs(
        services.store,
        services.ledger,
        run_id,
        container=settings.outputs_container,
        metadata_keys=manifest_metadata_keys(services, run_id),
    )


def manifest_metadata_keys(services: Services, run_id: str) -> tuple[str, ...] | None:
    """The manifest's metadata columns, from the first item of the run's first chunk.

    Every row of a CSV manifest has the same columns, so one item tells them all; the merged
    dataset's columns then do not depend on which item happens to be merged first (it may
    have lost its metadata.json). None when the run has no chunk to read.
    """
    try:
        items = read_chunk(services.store, chunk_blob_name(run_id, 0))
    except ResourceNotFoundError:
        return None
    return tuple(sorted(items[0].metadata)) if items else None


def register_output(
    services: Services, state: RunState, merged: MergeSummary
) -> DataAssetRegistration:
    """The merged dataset as the data asset the run names (``--register-output``)."""
    from batchctl.data_assets import register_merged_output

    return register_merged_output(services, state, merged)
