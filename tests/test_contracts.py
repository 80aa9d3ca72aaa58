"""Boundary models: round trips, shorthand parsing, and errors that name the field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from batchctl.contracts import (
    ErrorBudget,
    FrameSize,
    ItemError,
    ItemResult,
    ItemStatus,
    ManifestItem,
    RunOptions,
    RunPlan,
    RunProgress,
    RunRequest,
    WorkItem,
)


def test_run_request_round_trips_through_json() -> None:
    request = RunRequest(
        run_id="run-1",
        manifest="manifests/a.csv",
        options=RunOptions(error_budget="2.5%", frame_size="320x240", deadline_s=7200),
    )
    dumped = request.model_dump(mode="json")
    assert dumped["schema_version"] == 1
    assert RunRequest.model_validate(dumped) == request


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fps", 0),
        ("fps", -1),
        ("inference_batch_size", 0),
        ("mini_batch_size", 65),
        ("max_attempts", 0),
        ("visibility_timeout_s", 5),
        ("poll_interval_s", 0),
        ("task", "not a task"),
        ("error_budget", "lots"),
        ("error_budget", "150%"),
        ("frame_size", "big"),
        ("deadline_s", -5),
        ("unknown_option", 1),
    ],
)
def test_bad_option_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        RunOptions.model_validate({field: value})
    locations = [error["loc"] for error in caught.value.errors()]
    assert any(location and location[0] == field for location in locations), locations


def test_error_budget_shorthands() -> None:
    assert ErrorBudget.model_validate(10).allowed_failures(1000) == 10
    assert ErrorBudget.model_validate("10").allowed_failures(1000) == 10
    assert ErrorBudget.model_validate("1%").allowed_failures(150) == 1
    assert ErrorBudget.model_validate("0%").allowed_failures(150) == 0
    with pytest.raises(ValidationError):
        ErrorBudget(max_failed=1, max_failed_percent=1.0)
    with pytest.raises(ValidationError):
        ErrorBudget.model_validate(True)


def test_frame_size_shorthands() -> None:
    assert FrameSize.model_validate(224) == FrameSize(width=224, height=224)
    assert FrameSize.model_validate("320x240") == FrameSize(width=320, height=240)


@pytest.mark.parametrize("run_id", ["", "UPPER", "a--b", "-a", "a-", "a/b", "x" * 41, "a_b"])
def test_run_ids_that_would_break_queue_names_are_refused(run_id: str) -> None:
    with pytest.raises(ValidationError, match="run_id"):
        RunRequest(run_id=run_id, manifest="m.csv")


@pytest.mark.parametrize("item_id", ["../x", "a/b", ".hidden", "", "x" * 129, "a b"])
def test_item_ids_that_could_escape_a_prefix_are_refused(item_id: str) -> None:
    with pytest.raises(ValidationError, match="item_id"):
        ManifestItem(item_id=item_id, source="s", row=2)


def test_result_status_and_error_must_agree() -> None:
    with pytest.raises(ValidationError, match="needs an error"):
        ItemResult(run_id="r", item_id="i", status=ItemStatus.FAILED)
    error = ItemError(error_class="X", message="m", permanent=True, attempts=1)
    with pytest.raises(ValidationError, match="cannot carry an error"):
        ItemResult(run_id="r", item_id="i", status=ItemStatus.SUCCEEDED, error=error)


def test_work_item_limits_and_schema_version() -> None:
    item = ManifestItem(item_id="a", source="s", row=2)
    with pytest.raises(ValidationError, match="items"):
        WorkItem(run_id="r", items=[])
    with pytest.raises(ValidationError, match="schema_version"):
        WorkItem.model_validate({"schema_version": 2, "run_id": "r", "items": [item.model_dump()]})
    # Messages carry items only: options reach a node once, as its NodeSpec.
    with pytest.raises(ValidationError, match="options"):
        WorkItem.model_validate({"run_id": "r", "items": [item.model_dump()], "options": {}})


def test_each_audience_gets_only_its_options() -> None:
    options = RunOptions(fps=2, vm_size="Standard_NC6s_v3", error_budget="3", idle_exit_s=7)
    spec = options.node_spec()
    assert (spec.fps, spec.idle_exit_s, spec.max_attempts) == (2, 7, options.max_attempts)
    assert not hasattr(spec, "vm_size") and not hasattr(spec, "error_budget")
    settings = spec.task_settings()
    assert settings.fps == 2 and settings.model == options.model
    for hidden in ("vm_size", "error_budget", "max_nodes", "max_attempts", "deadline_s"):
        assert not hasattr(settings, hidden), hidden
    # The spec travels as JSON in a node's environment and comes back the same.
    assert type(spec).model_validate_json(spec.model_dump_json()) == spec


def test_plan_total_must_match_clusters() -> None:
    with pytest.raises(ValidationError, match="total_nodes"):
        RunPlan(
            run_id="r",
            clusters=[],
            total_nodes=3,
            est_makespan_s=1,
            est_cost=0,
            binding_limit="none",
        )


def test_progress_derived_figures() -> None:
    progress = RunProgress(run_id="r", phase="running", total=8, succeeded=5, failed=1)
    assert (progress.done, progress.remaining, progress.percent) == (6, 2, 75.0)
    assert RunProgress(run_id="r", phase="running", total=0, succeeded=0, failed=0).percent == 100
