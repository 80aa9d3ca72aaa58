"""Registers the run orchestrator with the Functions host."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import azure.durable_functions as df

from batchctl.activity_names import ORCHESTRATOR_NAME
from orchestrators.run import run_orchestrator as _run

bp = df.Blueprint()


@bp.function_name(ORCHESTRATOR_NAME)
@bp.orchestration_trigger(context_name="context")
def run_orchestrator(context: df.DurableOrchestrationContext) -> Generator[Any, Any, Any]:
    return _run(context)
