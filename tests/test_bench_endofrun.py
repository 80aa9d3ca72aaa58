"""bench/endofrun.py, small and fast: every end-of-run activity timed alone on the session's
Azurite, leaving an exact ledger and a report that counts every item."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchctl.local.staging import prepare_storage
from batchctl.services import Services
from bench import endofrun

pytestmark = pytest.mark.azurite


def test_every_end_of_run_activity_is_timed_and_extrapolated(
    services: Services, run_id: str
) -> None:
    prepare_storage(services.settings)  # the containers, as the benchmark's session has them
    sizes = []
    for suffix, items in (("-s", 20), ("-l", 160)):
        state = endofrun.prepare_run(services, run_id + suffix, items, not_run=0.25, seed=3)
        sizes.append((items, endofrun.measure(services, state)))
        ledger = services.ledger
        scan = ledger.counted_rows(state.run_id)
        # The end left every item exactly one record, the counters equal to a full scan.
        assert ledger.counts(state.run_id) == scan
        assert scan.succeeded + scan.failed + scan.not_run == items
        assert scan.not_run == round(items * 0.25) == sizes[-1][1]["not_run_written"]
        assert sum(sizes[-1][1]["report_counts"]) == items
    result = endofrun.figures(sizes[0], sizes[1], endofrun.function_timeout_s())
    activities = result["activities"]
    for name in (
        "teardown",
        "end_shard_groups",
        "record_unfinished_per_group",
        "analyse_shards_per_group",
        "write_report",
        "write_brief_report",
        "one_pass_report",
    ):
        row = activities[name]
        # Rounded: to 0.1 s at 1M, to 1 ms for the fixed part.
        assert row["s"] >= 0 and row["extrapolated_1m_s"] + 0.05 >= row["fixed_s"] >= 0
        assert row["share_of_timeout_1m"] == pytest.approx(row["upper_bound_1m_s"] / 1800, abs=1e-3)
    assert result["groups"] == 8 and result["items"] == 160
    assert result["end_s_per_1000"] >= result["end_critical_path_s_per_1000"] > 0
    assert result["largest_activity_share_of_timeout_1m"] > 0
    json.dumps(result)  # --json prints it


def test_the_timeout_is_read_from_host_json(tmp_path: Path) -> None:
    assert endofrun.function_timeout_s() == 1800.0  # host.json's 00:30:00
    odd = tmp_path / "host.json"
    odd.write_text(json.dumps({"functionTimeout": "-1"}))
    with pytest.raises(ValueError, match="functionTimeout '-1' is not hh:mm:ss"):
        endofrun.function_timeout_s(odd)


def test_the_fit_tells_a_fixed_cost_from_a_cost_per_item() -> None:
    assert endofrun._fit((100, 2.0 + 0.1), (1000, 2.0 + 1.0)) == pytest.approx((2.0, 0.001))
    # Measured a little slower at the small size: still a fixed cost, never a negative slope.
    assert endofrun._fit((100, 3.0), (1000, 2.5)) == (2.5, 0.0)


def test_the_figures_of_synthetic_timings() -> None:
    """A report with a large fixed part, groups costing 1 ms an item: the fit tells the two
    apart, the upper bound takes every second as per item (and ranks the report largest,
    where the fit would not), the end adds the groups one after another."""

    def measured(items: int) -> dict[str, object]:
        per_group = items * 0.001 / 8
        return {
            "seconds": {
                "teardown": 0.5,
                "end_shard_groups": 0.0,
                "write_report": 40.0 + items * 0.00005,
                "write_brief_report": 0.1,
                "one_pass_report": 2.0 + items * 0.001,
            },
            "groups_s": {"record_unfinished": [per_group] * 8, "analyse_shards": [per_group] * 8},
            "groups": 8,
            "not_run_written": 0,
            "report_counts": [items, 0, 0],
        }

    result = endofrun.figures((10_000, measured(10_000)), (100_000, measured(100_000)), 1800.0)
    report = result["activities"]["write_report"]
    assert report["fixed_s"] == pytest.approx(40.0) and report["extrapolated_1m_s"] == 90.0
    assert report["upper_bound_1m_s"] == 450.0 and report["share_of_timeout_1m"] == 0.25
    group = result["activities"]["record_unfinished_per_group"]
    assert group["extrapolated_1m_s"] == 125.0 and group["upper_bound_1m_s"] == 125.0
    # One core: teardown, the report and every group's call; side by side: the largest.
    assert result["end_s"] == pytest.approx(0.5 + 45.0 + 200.0)
    assert result["end_critical_path_s_per_1000"] == pytest.approx((0.5 + 45 + 25) / 100, 1e-3)
    # The largest by its upper bound: the report (by the fit it would be the group's call).
    assert result["largest_activity_upper_bound_1m_s"] == 450.0
    assert result["largest_activity_share_of_timeout_1m"] == 0.25
    assert result["one_pass_report_over_write_report"] == round(102 / 45, 2)
