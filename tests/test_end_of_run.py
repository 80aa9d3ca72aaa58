"""The end of a run in bounded steps: the report's statistics gathered a shard at a time and
merged, the report whatever fails, its phase markers stamped as the steps end, and the
sweeper's resumable close of a terminated run. Storage is Azurite."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from batchctl import controller
from batchctl.contracts import (
    ItemError,
    ItemResult,
    ItemStatus,
    NotRunReason,
    RunOptions,
    RunPhase,
    RunReport,
    RunState,
    StageTimings,
)
from batchctl.controller.closing import CloseProgress, close_steps
from batchctl.controller.names import close_progress_blob_name, report_part_blob_name
from batchctl.controller.records import shard_groups
from batchctl.controller.validation import fleet_nodes, run_shards
from batchctl.functions import api
from batchctl.reporting.analysis import RunAnalysis
from batchctl.services import Services
from batchctl.storage.ledger import partition_key, shard_of
from tests.fakes import FakeDurableClient, FakeStatus, FakeSweptCompute
from tests.test_terminate import prepared_run

START = datetime(2026, 3, 1, tzinfo=UTC)
END = START + timedelta(hours=2)


def random_results(rng: random.Random, count: int, run_id: str = "r") -> list[ItemResult]:
    """Records of every status, several nodes and error classes, some undated or dated
    outside the run (a node's clock off), in no order."""
    results = []
    for index in range(count):
        status = rng.choice(
            [ItemStatus.SUCCEEDED] * 6 + [ItemStatus.FAILED, ItemStatus.NOT_RUN, ItemStatus.SKIPPED]
        )
        ended_badly = status in (ItemStatus.FAILED, ItemStatus.NOT_RUN)
        error = (
            ItemError(
                error_class=rng.choice(["Decode", "Download", "Oom"]),
                message=f"m{index}",
                permanent=rng.random() < 0.5,
                attempts=rng.randint(1, 3),
            )
            if ended_badly
            else None
        )
        offset = rng.choice([rng.uniform(0, 7200), rng.uniform(0, 7200), 1e6, None])
        total = rng.uniform(0.1, 30)
        results.append(
            ItemResult(
                run_id=run_id,
                item_id=f"item-{index}",
                status=status,
                error=error,
                timings=StageTimings(
                    download_s=total / 4, decode_s=total / 4, inference_s=total / 2, total_s=total
                ),
                node=f"node-{rng.randint(0, 9)}:{rng.randint(1, 3)}",
                finished_at=None if offset is None else START + timedelta(seconds=offset),
                media_s=rng.choice([None, rng.uniform(1, 60)]),
            )
        )
    return results


def analysed(results: Iterable[ItemResult], sample_size: int) -> RunAnalysis:
    analysis = RunAnalysis(START, finished_at=END, sample_size=sample_size)
    for result in results:
        analysis.add(result)
    return analysis


def merged(parts: Iterable[Iterable[ItemResult]], sample_size: int) -> RunAnalysis:
    whole = RunAnalysis(START, finished_at=END, sample_size=sample_size)
    for part in parts:
        # Through JSON, as a part crosses from one activity to another.
        whole.absorb(
            type(whole.part()).model_validate_json(
                analysed(part, sample_size).part().model_dump_json()
            )
        )
    return whole


def same(ours: Any, theirs: Any) -> bool:
    """Equal, floats to 1e-9 relative (pydantic models compared field by field)."""
    if hasattr(ours, "model_dump"):
        return same(ours.model_dump(), theirs.model_dump())
    if isinstance(ours, dict):
        return ours.keys() == theirs.keys() and all(same(ours[k], theirs[k]) for k in ours)
    if isinstance(ours, list):
        return len(ours) == len(theirs) and all(map(same, ours, theirs))
    if isinstance(ours, float):
        return bool(ours == pytest.approx(theirs, rel=1e-9))
    return bool(ours == theirs)


@pytest.mark.parametrize("seed", range(5))
def test_parts_merged_give_the_statistics_of_one_pass(seed: int) -> None:
    rng = random.Random(seed)
    results = random_results(rng, rng.randint(200, 900))
    groups = rng.randint(2, 16)
    parts = [results[index::groups] for index in range(groups)]
    # A sample as large as the run keeps every value: then even the quantiles agree.
    one = analysed(results, sample_size=1000).summarize(END, None)
    many = merged(parts, sample_size=1000).summarize(END, None)
    assert many.timeline == one.timeline and many.timeline_bin_s == one.timeline_bin_s
    # Sums added in another order differ in the last bits only.
    assert same(many.stages, one.stages)
    assert same(many.nodes, one.nodes)
    assert many.undated == one.undated and many.media_items == one.media_items
    assert same(many.cost, one.cost) and same(many.media_s, one.media_s)
    assert [(f.error_class, f.count, f.permanent) for f in many.failures] == [
        (f.error_class, f.count, f.permanent) for f in one.failures
    ]
    assert all(len(f.examples) == min(f.count, 3) for f in many.failures)


@pytest.mark.parametrize("seed", range(3))
def test_merged_samples_stay_uniform_and_bounded(seed: int) -> None:
    """With samples smaller than the run, merged samples keep their size and exact
    figures, and hold values of the run only, drawn from every part."""
    rng = random.Random(seed)
    results = [r for r in random_results(rng, 3000) if r.status is ItemStatus.SUCCEEDED]
    parts = [results[index::4] for index in range(4)]
    one = analysed(results, sample_size=64).summarize(END, None)
    whole = merged(parts, sample_size=64)
    many = whole.summarize(END, None)
    for ours, theirs in zip(many.stages, one.stages, strict=True):
        assert (ours.count, ours.sample_size) == (theirs.count, theirs.sample_size)
        assert ours.mean_s == pytest.approx(theirs.mean_s)
        assert (ours.min_s, ours.max_s) == (theirs.min_s, theirs.max_s)
    totals = {r.timings.total_s for r in results}
    sample = whole._stages["total"].sample.values
    assert len(sample) == 64 and set(sample) <= totals
    # Each part holds a quarter of the values: a uniform sample of 64 draws from each.
    assert all(set(sample) & {r.timings.total_s for r in part} for part in parts)


def test_shard_groups_deal_every_shard_once() -> None:
    for count in (1, 3, 16, 17, 64):
        groups = shard_groups(list(range(count)))
        assert len(groups) == min(count, controller.END_GROUPS)
        assert sorted(itertools.chain.from_iterable(groups)) == list(range(count))
        assert max(map(len, groups)) - min(map(len, groups)) <= 1
    assert shard_groups([]) == []
    with pytest.raises(ValueError, match="groups must be at least 1"):
        shard_groups([1], 0)


# -- against Azurite -------------------------------------------------------------------------
def _state(services: Services, tmp: Path, run_id: str, items: int) -> RunState:
    media_root = Path(services.settings.local_media_root or "")
    state = prepared_run(services, media_root / run_id, run_id, items)
    return state.model_copy(update={"started_at": datetime.now(UTC) - timedelta(minutes=5)})


def _record_some(services: Services, run_id: str, rng: random.Random, items: int) -> int:
    chosen = rng.sample(range(items), items // 2)
    results = []
    for index in chosen:
        failed = rng.random() < 0.3
        results.append(
            ItemResult(
                run_id=run_id,
                item_id=f"item-{index}",
                status=ItemStatus.FAILED if failed else ItemStatus.SUCCEEDED,
                error=ItemError(error_class="Decode", message="bad", permanent=True, attempts=1)
                if failed
                else None,
                node="node-1:7",
                finished_at=datetime.now(UTC),
                timings=StageTimings(total_s=1.0),
            )
        )
    return services.ledger.record_absent(results)


def _report(services: Services, run_id: str) -> RunReport:
    data = services.store.download_bytes(
        services.settings.runs_container, controller.report_blob_name(run_id)
    )
    return RunReport.model_validate_json(data)


@pytest.mark.azurite
@pytest.mark.parametrize("shards", [None, 40])
def test_the_end_by_shard_groups_equals_one_pass(
    tmp_path: Path, services: Services, run_id: str, shards: int | None
) -> None:
    """The orchestrator's steps, group by group, leave the ledger and the report that the
    whole-run calls leave: every item one record, the counts of a full scan, index.csv;
    for a run whose shard count is its own (fixed before its first record) too."""
    if shards is not None:
        assert services.ledger.fix_shard_count(run_id, shards) == shards
    state = _state(services, tmp_path, run_id, 40)
    # Unfixed, the validation chose them for its fleet (a local session's: LOCAL_SHARDS).
    chosen = run_shards(services.settings, fleet_nodes(services.settings, RunOptions().max_nodes))
    assert len(services.ledger.shards(run_id)) == (shards or chosen)
    recorded = _record_some(services, run_id, random.Random(7), 40)
    groups = controller.end_shard_groups(services, run_id)
    assert sorted(itertools.chain.from_iterable(groups)) == list(services.ledger.shards(run_id))
    written = sum(
        controller.record_unfinished(services, state, NotRunReason.TERMINATED, group)
        for group in groups
    )
    assert written == 40 - recorded
    # Again: idempotent, nothing more.
    assert (
        sum(
            controller.record_unfinished(services, state, NotRunReason.TERMINATED, g)
            for g in groups
        )
        == 0
    )
    finished = datetime.now(UTC)
    analysed_records = sum(
        controller.analyse_shards(services, state, group, finished) for group in groups
    )
    assert analysed_records == 40
    by_parts = controller.write_report(services, state, RunPhase.CANCELLED, "x", finished)
    scan = services.ledger.counted_rows(run_id)
    assert services.ledger.counts(run_id) == scan
    assert (by_parts.succeeded, by_parts.failed, by_parts.not_run) == (
        scan.succeeded,
        scan.failed,
        scan.not_run,
    )
    index = services.store.download_bytes(
        services.settings.runs_container, f"{run_id}/index.csv"
    ).decode()
    statuses = {line.split(",")[1]: line.split(",")[3] for line in index.splitlines()[1:]}
    ledger_statuses = {r.item_id: r.status.value for r in services.ledger.iter_results(run_id)}
    assert statuses == ledger_statuses
    # The parts written for this end are what write_report merged: a report written with
    # every part deleted (gathered inline) says the same.
    for shard in services.ledger.shards(run_id):
        services.store.delete(
            services.settings.runs_container, report_part_blob_name(run_id, shard)
        )
    inline = controller.write_report(services, state, RunPhase.CANCELLED, "x", finished)
    assert inline.model_dump(exclude={"phases"}) == by_parts.model_dump(exclude={"phases"})


@pytest.mark.azurite
def test_a_shard_that_cannot_be_read_still_leaves_a_report_that_says_so(
    tmp_path: Path, services: Services, run_id: str
) -> None:
    state = _state(services, tmp_path, run_id, 12)
    _record_some(services, run_id, random.Random(3), 12)
    # A record no model reads (written past the ledger: a payload of another format).
    shards = len(services.ledger.shards(run_id))
    broken_shard = shard_of("zz-broken", shards)
    services.ledger._table.create_entity(
        {
            "PartitionKey": partition_key(run_id, broken_shard),
            "RowKey": "zz-broken",
            "status": "succeeded",
            "payload": "{not json",
        }
    )
    report = controller.write_report(
        services, state, RunPhase.COMPLETED, "all done", datetime.now(UTC)
    )
    counts = services.ledger.counts(run_id)  # the counters, which the bad row never joined
    assert (report.succeeded, report.failed) == (counts.succeeded, counts.failed)
    assert report.message.startswith(f"all done; the statistics of 1 of {shards} ledger shards")
    assert f"shard {broken_shard}" in report.message
    assert report.index_csv is None and report.failed_csv is None
    assert _report(services, run_id).message == report.message  # report.json written


@pytest.mark.azurite
def test_the_brief_report_holds_the_ledgers_counts(
    tmp_path: Path, services: Services, run_id: str
) -> None:
    state = _state(services, tmp_path, run_id, 6)
    recorded = _record_some(services, run_id, random.Random(5), 6)
    report = controller.write_brief_report(
        services, state, RunPhase.COMPLETED, "done", datetime.now(UTC), problem="boom"
    )
    written = _report(services, run_id)
    assert written == report
    assert report.succeeded + report.failed == recorded
    assert report.total == 6 and report.stats is None
    assert "the full report could not be written (boom)" in report.message


@pytest.mark.azurite
def test_phase_markers_are_stamped_when_each_step_ended(
    tmp_path: Path, services: Services, run_id: str
) -> None:
    state = _state(services, tmp_path, run_id, 4)
    _record_some(services, run_id, random.Random(1), 4)
    started = state.started_at
    assert started is not None
    torn_down = started + timedelta(minutes=2)
    recorded = started + timedelta(minutes=3)
    finished = started + timedelta(minutes=3, seconds=1)
    before = datetime.now(UTC)
    controller.write_report(
        services,
        state,
        RunPhase.CANCELLED,
        "",
        finished,
        marks=controller.EndMarks(torn_down_at=torn_down, not_run_recorded_at=recorded),
    )
    markers = {m.name: m.t_s for m in _report(services, run_id).phases}
    assert markers["torn down"] == 120.0
    assert markers["not run recorded"] == 180.0
    # Stamped as the report was written, not at the end the orchestrator named.
    assert markers["report written"] >= (before - started).total_seconds()
    assert list(markers)[-1] == "report written"


# -- the sweeper's close, resumable ---------------------------------------------------------
@pytest.mark.azurite
def test_a_close_cut_short_is_finished_by_later_passes_exactly_once(
    tmp_path: Path,
    services: Services,
    run_id: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each pass does one step (a budget of 0); the first pass that records not-run items
    is killed half-way through its writes. Later passes go on and finish; every item has
    one record, the counters equal a full scan, and the report says so."""
    items = 60
    state = _state(services, tmp_path, run_id, items)
    recorded = _record_some(services, run_id, random.Random(11), items)
    last_input = state.model_dump_json()
    original = services.ledger.record_absent
    kills = {"left": 1}

    def killed_half_way(results: Iterable[ItemResult]) -> int:
        if not kills["left"]:
            return original(results)
        kills["left"] -= 1
        pending = list(results)
        original(pending[: len(pending) // 2])
        raise RuntimeError("the timer call was killed")

    monkeypatch.setattr(services.ledger, "record_absent", killed_half_way)
    backend = FakeSweptCompute()
    client = FakeDurableClient(
        terminated=[FakeStatus("Terminated", instance_id=run_id, input_=last_input)]
    )

    def one_step(target: str, payload: Any) -> bool:
        return controller.finalize_terminated(services, target, payload, budget_s=0)

    passes = 0
    failures = 0
    while True:
        passes += 1
        assert passes < 40, "the close never finished"
        kills_before = kills["left"]
        with caplog.at_level(logging.ERROR, logger="batchctl.functions.api"):
            swept = asyncio.run(api.sweep(client, backend, one_step))
        if kills["left"] < kills_before:
            # The killed pass: the sweeper logged the run's failure and went on without it
            # (one run's failing close must not stop the pass for every run after it).
            assert not swept and f"closing terminated run {run_id} failed" in caplog.text
            failures += 1
            continue
        if not swept:
            break
    progress = CloseProgress.model_validate_json(
        services.store.download_bytes(
            services.settings.runs_container, close_progress_blob_name(run_id)
        )
    )
    steps = close_steps(progress.groups, has_state=True)
    assert failures == 1
    assert progress.done == steps
    # One pass a step, one killed pass, and the pass that found the close done.
    assert passes == len(steps) + 2
    scan = services.ledger.counted_rows(run_id)
    assert services.ledger.counts(run_id) == scan
    assert scan.succeeded + scan.failed == recorded
    assert scan.not_run == items - recorded
    ids = [r.item_id for r in services.ledger.iter_results(run_id)]
    assert len(ids) == len(set(ids)) == items
    report = _report(services, run_id)
    assert report.phase is RunPhase.CANCELLED
    assert (report.not_run, report.succeeded + report.failed) == (items - recorded, recorded)
    assert {"torn down", "not run recorded", "report written"} <= {m.name for m in report.phases}
    assert services.queues(run_id).exists()["input"] is False  # torn down


@pytest.mark.azurite
def test_a_close_with_time_left_does_every_step_in_one_pass(
    tmp_path: Path, services: Services, run_id: str
) -> None:
    state = _state(services, tmp_path, run_id, 8)
    _record_some(services, run_id, random.Random(2), 8)
    ticks = iter(range(1000))
    assert controller.finalize_terminated(
        services, run_id, state.model_dump(mode="json"), budget_s=1e9, clock=lambda: next(ticks)
    )
    assert _report(services, run_id).not_run == services.ledger.counts(run_id).not_run
    assert not controller.finalize_terminated(services, run_id, state.model_dump(mode="json"))


@pytest.mark.azurite
def test_a_close_without_a_readable_state_tears_down_only(services: Services, run_id: str) -> None:
    controller.create_run_queues(services, run_id)
    assert controller.finalize_terminated(services, run_id, "not a run state", budget_s=0)
    progress = json.loads(
        services.store.download_bytes(
            services.settings.runs_container, close_progress_blob_name(run_id)
        )
    )
    assert progress["done"] == ["teardown"]
    assert not services.store.exists(
        services.settings.runs_container, controller.report_blob_name(run_id)
    )
    assert not controller.finalize_terminated(services, run_id, "not a run state")
