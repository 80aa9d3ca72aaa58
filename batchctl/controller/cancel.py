"""A run's durable cancel flag."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from batchctl.controller.names import cancel_flag_blob_name
from batchctl.services import Services

log = logging.getLogger(__name__)


# -- names ----------------------------------------------------------------------------------


def request_cancel(services: Services, run_id: str) -> None:
    """Set the run's durable cancel flag. Idempotent.

    The cancel event can be lost (Durable discards events raised while an orchestration
    continues as new); the flag cannot, and every poll reads it.
    """
    services.store.upload_bytes(
        services.settings.runs_container,
        cancel_flag_blob_name(run_id),
        datetime.now(UTC).isoformat(),
        overwrite=True,
    )


def cancel_requested(services: Services, run_id: str) -> bool:
    return services.store.exists(services.settings.runs_container, cancel_flag_blob_name(run_id))
