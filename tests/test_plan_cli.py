"""`batchctl plan`: the command line over the planner."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchctl import cli


@pytest.fixture(autouse=True)
def _plan_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run against the real entry point, with `plan` registered whatever the list holds."""
    if "plan" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "plan"))


def run_plan(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def last_json(out: str) -> dict[str, Any]:
    value = json.loads(out.strip().splitlines()[-1])
    assert isinstance(value, dict)
    return value


def test_twenty_thousand_items_meet_a_two_hour_deadline_with_startup_counted(capsys) -> None:
    code, out, _ = run_plan(
        capsys, "--items", "20000", "--sec-per-item", "20", "--deadline", "2h", "--json"
    )
    assert code == 0
    plan = last_json(out)
    assert set(plan) >= {
        "clusters",
        "nodes_per_cluster",
        "total_nodes",
        "est_makespan_s",
        "est_cost",
        "binding_limit",
    }
    assert plan["binding_limit"] == "deadline"
    assert plan["meets_deadline"] is True
    assert plan["clusters"] == len(plan["nodes_per_cluster"])
    assert sum(plan["nodes_per_cluster"]) == plan["total_nodes"]
    assert all(1 <= nodes <= 100 for nodes in plan["nodes_per_cluster"])
    # Start-up is counted: the makespan is start-up plus the busiest node's items.
    assert plan["startup_s"] == 300
    busiest = math.ceil(20000 / plan["total_nodes"])
    assert plan["est_makespan_s"] == pytest.approx(300 + busiest * 20)
    assert plan["est_makespan_s"] <= 7200
    assert plan["est_cost"] > 0


def test_the_table_names_the_plan(capsys) -> None:
    code, out, _ = run_plan(capsys, "--items", "20000", "--sec-per-item", "20", "--deadline", "2h")
    assert code == 0
    assert "total nodes" in out and "binding limit" in out and "deadline" in out
    assert "Standard_NC4as_T4_v3 (low priority)" in out


def test_quota_binding_is_reported(capsys) -> None:
    code, out, _ = run_plan(
        capsys,
        "--items", "20000", "--sec-per-item", "20", "--deadline", "2h",
        "--quota-cores", "48", "--json",
    )  # fmt: skip
    plan = last_json(out)
    assert code == 3  # the plan is printed, and refused: it misses the deadline
    assert plan["binding_limit"] == "quota"
    assert plan["total_nodes"] == 12
    assert plan["meets_deadline"] is False
    assert any("quota is the binding limit" in note for note in plan["notes"])


def test_many_nodes_spread_over_clusters_without_loss(capsys) -> None:
    code, out, _ = run_plan(
        capsys, "--items", "100000", "--sec-per-item", "20", "--deadline", "1h",
        "--max-nodes", "500", "--allow-late", "--json",
    )  # fmt: skip
    plan = last_json(out)
    assert code == 0  # 500 nodes miss the hour; accepted, this is about the split
    assert plan["nodes_per_cluster"] == [100] * 5
    assert plan["binding_limit"] == "max_nodes"


def test_dedicated_costs_more_than_low_priority(capsys) -> None:
    common = ["--items", "5000", "--sec-per-item", "20", "--deadline", "2h", "--json"]
    _, low, _ = run_plan(capsys, *common)
    _, dedicated, _ = run_plan(capsys, *common, "--dedicated")
    assert last_json(dedicated)["low_priority"] is False
    assert last_json(dedicated)["est_cost"] > last_json(low)["est_cost"]


def test_price_override(capsys) -> None:
    _, out, _ = run_plan(capsys, "--items", "100", "--sec-per-item", "36", "--price", "2", "--json")
    plan = last_json(out)
    assert plan["price_source"] == "given"
    assert plan["price_per_hour"] == 2


def test_manifest_rows_are_counted_as_csv_records(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "videos.csv"
    rows = ["id,video,note"]
    rows += [f"v{n},https://acct.blob.core.windows.net/media/v{n}.mp4,x" for n in range(40)]
    rows.append('v40,https://acct.blob.core.windows.net/media/v40.mp4,"two\nlines"')
    rows.append("")  # a blank row is not an item
    manifest.write_text("\n".join(rows) + "\n", encoding="utf-8")
    code, out, _ = run_plan(capsys, "--manifest", str(manifest), "--sec-per-item", "20", "--json")
    assert code == 0
    plan = last_json(out)
    assert plan["items"] == 41
    assert plan["total_nodes"] == 41  # fewer items than max_nodes: one each
    assert plan["binding_limit"] == "items"


def test_simulation_is_reported(capsys) -> None:
    code, out, _ = run_plan(
        capsys, "--items", "2000", "--sec-per-item", "20", "--deadline", "1h",
        "--simulate", "3", "--json",
    )  # fmt: skip
    plan = last_json(out)
    assert code == 0
    assert plan["sim_runs"] == 3
    assert plan["sim_makespan_p50_s"] <= plan["sim_makespan_max_s"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--items", "10", "--sec-per-item", "20", "--quota-cores", "2"], "quota"),
        (
            ["--items", "10", "--sec-per-item", "20", "--vm-size", "X", "--quota-cores", "9"],
            "cores",
        ),
    ],
)
def test_impossible_plans_exit_2_with_a_reason(capsys, args: list[str], message: str) -> None:
    code, _, err = run_plan(capsys, *args)
    assert code == 2
    assert message in err


@pytest.mark.parametrize(
    "args",
    [
        ["--sec-per-item", "20"],  # neither --items nor --manifest
        ["--items", "10", "--manifest", "m.csv", "--sec-per-item", "20"],
        ["--items", "10"],  # --sec-per-item is required
        ["--items", "10", "--sec-per-item", "0"],
        ["--items", "10", "--sec-per-item", "20", "--deadline", "soon"],
        ["--items", "10", "--sec-per-item", "20", "--low-priority", "--dedicated"],
        ["--manifest", "/nonexistent/m.csv", "--sec-per-item", "20"],  # bad input, not "no plan"
    ],
)
def test_bad_arguments_are_bad_input_in_one_line(capsys, args: list[str]) -> None:
    code, out, err = run_plan(capsys, *args)
    assert code == 3
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_module_entry_point_prints_a_final_json_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "batchctl", "plan", "--items", "20000", "--sec-per-item", "20",
         "--deadline", "2h", "--json"],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    if result.returncode == 2 and "invalid choice" in result.stderr:
        pytest.skip("`plan` is not in batchctl.cli.COMMAND_MODULES in this checkout")
    assert result.returncode == 0, result.stderr
    assert last_json(result.stdout)["est_makespan_s"] <= 7200


# -- by video length ----------------------------------------------------------------------------


def _durations_manifest(path: Path, durations: list[str]) -> Path:
    rows = ["video,duration_s", *(f"v{index}.mp4,{d}" for index, d in enumerate(durations))]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_a_long_video_binds_the_plan_and_the_note_suggests_segments(capsys, tmp_path: Path) -> None:
    manifest = _durations_manifest(tmp_path / "m.csv", ["300"] * 20 + ["50m"])
    common = ["--manifest", str(manifest), "--sec-per-video-second", "1", "--json"]
    code, out, _ = run_plan(capsys, *common)
    assert code == 0
    plan = last_json(out)
    assert plan["model"] == "per_video_second"
    assert plan["media_s"] == 9000 and plan["pieces"] == 21
    assert plan["straggler"] is True
    assert plan["est_makespan_s"] == pytest.approx(300 + 3000)
    assert any("straggler" in note and "--segment-seconds" in note for note in plan["notes"])

    code, out, _ = run_plan(capsys, *common, "--segment-seconds", "300")
    split = last_json(out)
    assert code == 0 and split["straggler"] is False and split["pieces"] == 30
    assert split["est_makespan_s"] == pytest.approx(300 + 300)
    assert not any("straggler" in note for note in split["notes"])


def test_empty_durations_count_as_the_mean_and_a_note_says_so(capsys, tmp_path: Path) -> None:
    manifest = _durations_manifest(tmp_path / "m.csv", ["100", "", "300"])
    code, out, _ = run_plan(
        capsys, "--manifest", str(manifest), "--sec-per-video-second", "2", "--json"
    )
    plan = last_json(out)
    assert code == 0 and plan["estimated_durations"] == 1
    assert plan["media_s"] == pytest.approx(600)
    assert any("1 rows without a duration_s count as the mean" in n for n in plan["notes"])


def test_a_bad_duration_names_the_file_row_and_field(capsys, tmp_path: Path) -> None:
    # Row 4 (the header is row 1): the third data row.
    manifest = _durations_manifest(tmp_path / "m.csv", ["100", "200", "five minutes", "-3"])
    code, out, err = run_plan(capsys, "--manifest", str(manifest), "--sec-per-video-second", "1")
    assert code == 3 and out == ""
    assert f"{manifest}: row 4 (line 4), field 'duration_s'" in err
    assert "five minutes" in err and len(err.strip().splitlines()) == 1


def test_per_video_second_needs_a_duration_column(capsys, tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("video\na.mp4\n")
    code, _, err = run_plan(capsys, "--manifest", str(manifest), "--sec-per-video-second", "1")
    assert code == 3 and "no duration_s column" in err
    code, _, err = run_plan(capsys, "--items", "3", "--sec-per-video-second", "1")
    assert code == 3 and "--sec-per-video-second" in err


def test_the_per_item_plan_of_a_manifest_with_durations_is_unchanged(
    capsys, tmp_path: Path
) -> None:
    manifest = _durations_manifest(tmp_path / "m.csv", ["300"] * 20 + ["3000"])
    code, out, _ = run_plan(capsys, "--manifest", str(manifest), "--sec-per-item", "20", "--json")
    plan = last_json(out)
    assert code == 0 and plan["model"] == "per_item" and plan["items"] == 21
    assert plan["est_makespan_s"] == pytest.approx(300 + 20)


def test_sec_per_item_with_sec_per_video_second_is_an_overhead_per_piece(
    capsys, tmp_path: Path
) -> None:
    manifest = _durations_manifest(tmp_path / "m.csv", ["600"] * 4)
    common = ["--manifest", str(manifest), "--sec-per-video-second", "1", "--max-nodes", "1"]
    _, out, _ = run_plan(capsys, *common, "--json")
    _, with_overhead, _ = run_plan(capsys, *common, "--sec-per-item", "30", "--json")
    assert last_json(with_overhead)["est_makespan_s"] == pytest.approx(
        last_json(out)["est_makespan_s"] + 4 * 30
    )


# -- a deadline the caps cannot meet (issue 25) ---------------------------------------------------

# 1,000,000 items x 20 s in 2h (1h48m once the 10 % headroom is held back, 5 m of it start-up):
# 309 items a node, so 3,237 nodes; Standard_NC4as_T4_v3 has 4 cores, so 12,948 vCPUs.
MILLION = ["--items", "1000000", "--sec-per-item", "20", "--deadline", "2h"]
MILLION_LINE = (
    "batchctl plan: deadline 2h not met: the plan's 100 nodes (capped by --max-nodes) take "
    "55h38m20s; meeting it takes 3,237 nodes: 12,948 low-priority NCASv3_T4 vCPUs, "
    "est. $628.65; to meet it pass --max-nodes 3237 --max-clusters 33, or give a later "
    "--deadline, or accept this plan with --allow-late"
)


def test_a_deadline_the_caps_cannot_meet_is_refused_in_one_line_with_what_meets_it(
    capsys,
) -> None:
    code, out, err = run_plan(capsys, *MILLION)
    assert code == 3
    assert "total nodes        100" in out  # the plan is still printed, on stdout
    assert err.splitlines() == [MILLION_LINE]


def test_the_json_carries_what_meeting_the_deadline_takes(capsys) -> None:
    from batchctl.planning import cost_usd

    code, out, err = run_plan(capsys, *MILLION, "--json")
    plan = last_json(out)
    assert code == 3
    assert err.splitlines() == [MILLION_LINE]
    # Every field a plan had before is still there.
    assert set(plan) >= {
        "model", "items", "sec_per_item", "startup_s", "deadline_s", "vm_size", "low_priority",
        "price_per_hour", "price_source", "clusters", "nodes_per_cluster", "total_nodes",
        "est_makespan_s", "est_cost", "binding_limit", "meets_deadline", "notes",
    }  # fmt: skip
    assert plan["total_nodes"] == 100 and plan["binding_limit"] == "max_nodes"
    assert plan["meets_deadline"] is False
    assert plan["nodes_to_meet_deadline"] == 3237
    assert plan["vcpus_to_meet_deadline"] == 12948
    assert plan["quota_family"] == "standardNCASv3_T4Family"
    assert plan["quota_cores"] is None
    # The plan's own cost model, at the size that meets the deadline.
    expected = cost_usd(1_000_000, 3237, 20.0, 300.0, price_per_hour=0.105, scale_down_s=120.0)
    assert plan["cost_to_meet_deadline_usd"] == round(expected, 2) == 628.65
    assert plan["allow_late"] is False
    assert "batchctl plan: " + plan["deadline_warning"] == MILLION_LINE


def test_allow_late_accepts_the_plan_and_prints_the_line_as_a_warning(capsys) -> None:
    code, out, err = run_plan(capsys, *MILLION, "--allow-late", "--json")
    plan = last_json(out)
    assert code == 0
    assert plan["allow_late"] is True and plan["meets_deadline"] is False
    assert plan["nodes_to_meet_deadline"] == 3237
    assert err.splitlines() == [
        "batchctl plan: warning: deadline 2h not met: the plan's 100 nodes (capped by "
        "--max-nodes) take 55h38m20s; meeting it takes 3,237 nodes: 12,948 low-priority "
        "NCASv3_T4 vCPUs, est. $628.65; to meet it pass --max-nodes 3237 --max-clusters 33, "
        "or give a later --deadline; accepted as it is with --allow-late"
    ]


def test_a_deadline_that_is_met_exits_0_with_no_line(capsys) -> None:
    code, out, err = run_plan(
        capsys, "--items", "20000", "--sec-per-item", "20", "--deadline", "2h", "--json"
    )
    plan = last_json(out)
    assert code == 0 and err == ""
    assert plan["meets_deadline"] is True and plan["deadline_warning"] is None
    # What meeting it takes is there too: the fewest nodes, here the plan itself.
    assert plan["nodes_to_meet_deadline"] == plan["total_nodes"] == 65
    assert plan["vcpus_to_meet_deadline"] == 260
    assert plan["cost_to_meet_deadline_usd"] == plan["est_cost"]
    # Without a deadline there is nothing to meet.
    code, out, err = run_plan(capsys, "--items", "20000", "--sec-per-item", "20", "--json")
    plan = last_json(out)
    assert code == 0 and err == ""
    assert plan["meets_deadline"] is None and plan["deadline_warning"] is None
    assert plan["nodes_to_meet_deadline"] is None and plan["cost_to_meet_deadline_usd"] is None


def test_the_line_compares_the_need_with_the_quota_given(capsys) -> None:
    code, _, err = run_plan(capsys, *MILLION, "--quota-cores", "400")
    assert code == 3
    assert err.splitlines() == [
        "batchctl plan: deadline 2h not met: the plan's 100 nodes (capped by --quota-cores) "
        "take 55h38m20s; meeting it takes 3,237 nodes: 12,948 low-priority NCASv3_T4 vCPUs "
        "(your quota is 400), est. $628.65; to meet it get quota for 12,948 low-priority "
        "vCPUs and pass --max-nodes 3237 --max-clusters 33, or give a later --deadline, or "
        "accept this plan with --allow-late"
    ]
    # A quota that would allow it: compared, and only the flags are to change.
    code, out, err = run_plan(capsys, *MILLION, "--quota-cores", "20000", "--json")
    assert code == 3 and last_json(out)["quota_cores"] == 20000
    assert "12,948 low-priority NCASv3_T4 vCPUs (your quota is 20,000)" in err
    assert "get quota" not in err and "to meet it pass --max-nodes 3237" in err


@pytest.mark.parametrize(
    ("args", "pieces"),
    [
        # Dedicated V100s: the tier and family follow the size.
        (
            ["--vm-size", "Standard_NC6s_v3", "--dedicated", "--max-nodes", "2000"],
            [
                "the plan's 2,000 nodes (capped by --max-clusters) take",
                "meeting it takes 3,237 nodes: 19,422 dedicated NCSv3 vCPUs, est. $",
                "to meet it pass --max-nodes 3237 --max-clusters 33,",
            ],
        ),
        # A dedicated quota is per family: the request to make names it.
        (
            ["--vm-size", "Standard_NC6s_v3", "--dedicated", "--quota-cores", "600"],
            [
                "the plan's 100 nodes (capped by --quota-cores) take",
                "19,422 dedicated NCSv3 vCPUs (your quota is 600), est. $",
                "to meet it get quota for 19,422 dedicated NCSv3 vCPUs and pass --max-nodes",
            ],
        ),
        # More nodes than one run may have: no flag fixes it.
        (
            ["--items", "10000000"],
            [
                "meeting it takes 32,363 nodes: 129,452 low-priority NCASv3_T4 vCPUs",
                "to meet it split the work into runs of at most 10,000 nodes, or give a later",
            ],
        ),
        # No fleet size: start-up alone overruns 5 m less its headroom.
        (
            ["--deadline", "5m"],
            [
                "the plan's 100 nodes (capped by --max-nodes) take 55h38m20s;",
                "no fleet size meets it (start-up plus the longest piece of work exceed the "
                "deadline less its 10% headroom); to meet it give a later --deadline, or "
                "accept this plan with --allow-late",
            ],
        ),
        # A size whose cores and price are unknown: the line says what to pass.
        (
            ["--vm-size", "Standard_Foo"],
            [
                "3,237 low-priority Standard_Foo nodes (vCPUs unknown: pass --cores-per-vm), "
                "cost unknown (pass --price)"
            ],
        ),
    ],
)
def test_the_line_follows_the_size_tier_and_limits(
    capsys, args: list[str], pieces: list[str]
) -> None:
    # Later flags win: MILLION's --items and --deadline are overridden where given again.
    code, out, err = run_plan(capsys, *MILLION, *args, "--json")
    assert code == 3
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("batchctl plan: deadline ")
    for piece in pieces:
        assert piece in lines[0]
    plan = last_json(out)
    assert plan["meets_deadline"] is False and plan["deadline_warning"] in lines[0]


def test_a_long_video_no_fleet_can_finish_in_time_suggests_segments(capsys, tmp_path: Path) -> None:
    # One 50 m video at 1 node-s per video second cannot fit 30 m on any number of nodes.
    manifest = _durations_manifest(tmp_path / "m.csv", ["300"] * 20 + ["50m"])
    code, out, err = run_plan(
        capsys, "--manifest", str(manifest), "--sec-per-video-second", "1", "--deadline", "30m",
        "--json",
    )  # fmt: skip
    plan = last_json(out)
    assert code == 3
    assert plan["meets_deadline"] is False and plan["nodes_to_meet_deadline"] is None
    assert plan["vcpus_to_meet_deadline"] is None and plan["cost_to_meet_deadline_usd"] is None
    assert err.splitlines() == [
        "batchctl plan: deadline 30m not met: the plan's 21 nodes (a node for every piece of "
        "work) take 55m; no fleet size meets it (start-up plus the longest piece of work "
        "exceed the deadline less its 10% headroom); to meet it give a later --deadline or "
        "split long videos with --segment-seconds, or accept this plan with --allow-late"
    ]
