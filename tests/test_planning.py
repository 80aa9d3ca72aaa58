"""The fleet planner: invariants as properties (hypothesis), plus worked examples."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from batchctl.contracts import RunOptions, RunPlan
from batchctl.planning import (
    DEFAULT_SCALE_DOWN_S,
    KNOWN_VM_SIZES,
    MAX_NODES_PER_CLUSTER,
    MAX_SEGMENTS_PER_ITEM,
    PlanError,
    PlanInputs,
    billed_node_seconds,
    cluster_name,
    cost_usd,
    find_vm_size,
    format_duration,
    inputs_from_options,
    list_schedule_window_s,
    makespan_s,
    media_work,
    node_leaves_at,
    nodes_needed,
    parse_duration,
    plan_run,
    segment_pieces,
    size_fleet,
    split_nodes,
)
from batchctl.simulation import SimulationInputs, simulate

# -- strategies ---------------------------------------------------------------------------------

deadlines = st.one_of(st.none(), st.floats(min_value=60, max_value=48 * 3600))


@st.composite
def plan_inputs(draw: st.DrawFn, *, with_deadline: bool | None = None) -> PlanInputs:
    if with_deadline is None:
        deadline = draw(deadlines)
    elif with_deadline:
        deadline = draw(st.floats(min_value=60, max_value=48 * 3600))
    else:
        deadline = None
    return PlanInputs(
        items=draw(st.integers(min_value=0, max_value=60_000)),
        sec_per_item=draw(st.floats(min_value=0.1, max_value=900)),
        startup_s=draw(st.floats(min_value=0, max_value=1800)),
        deadline_s=deadline,
        headroom=draw(st.sampled_from([0.0, 0.1, 0.25])),
        cores_per_vm=draw(st.sampled_from([4, 6, 8, 24, 96])),
        low_priority=draw(st.booleans()),
        price_per_hour=draw(st.floats(min_value=0, max_value=30)),
        quota_cores=draw(st.one_of(st.none(), st.integers(min_value=0, max_value=5000))),
        max_nodes=draw(st.integers(min_value=1, max_value=3000)),
        max_clusters=draw(st.integers(min_value=1, max_value=30)),
    )


def fleet_or_none(inputs: PlanInputs):
    """size_fleet, or None where the quota allows no node (PlanError, tested separately)."""
    try:
        return size_fleet(inputs)
    except PlanError:
        return None


def cap_of(inputs: PlanInputs) -> int:
    caps = [inputs.items, inputs.max_nodes, inputs.max_clusters * inputs.max_nodes_per_cluster]
    if inputs.quota_nodes is not None:
        caps.append(inputs.quota_nodes)
    return min(caps)


def brute_force_needed(inputs: PlanInputs) -> int | None:
    """The fewest nodes meeting the target, by trying every size the caps allow."""
    assert inputs.target_s is not None
    for nodes in range(1, cap_of(inputs) + 1):
        if (
            makespan_s(inputs.items, nodes, inputs.sec_per_item, inputs.startup_s)
            <= inputs.target_s
        ):
            return nodes
    return None


# -- splitting nodes over clusters -------------------------------------------------------------


def test_split_drops_no_node() -> None:
    assert split_nodes(500) == [100] * 5
    assert split_nodes(250) == [84, 83, 83]
    assert sum(split_nodes(496)) == 496
    assert split_nodes(0) == []


@given(st.integers(min_value=0, max_value=100_000), st.integers(min_value=1, max_value=100))
def test_split_properties(total: int, per_cluster: int) -> None:
    parts = split_nodes(total, per_cluster)
    assert sum(parts) == total
    assert all(1 <= part <= per_cluster for part in parts)
    assert len(parts) == math.ceil(total / per_cluster)
    if parts:
        assert max(parts) - min(parts) <= 1


# -- invariants of a plan ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(plan_inputs())
def test_plan_respects_every_cap(inputs: PlanInputs) -> None:
    fleet = fleet_or_none(inputs)
    assume(fleet is not None)
    assert fleet is not None
    assert all(1 <= nodes <= MAX_NODES_PER_CLUSTER for nodes in fleet.nodes_per_cluster)
    assert len(fleet.nodes_per_cluster) <= inputs.max_clusters
    assert fleet.total_nodes <= inputs.max_nodes
    assert fleet.total_nodes <= inputs.items  # never more nodes than items
    if inputs.quota_cores is not None:
        assert fleet.total_nodes * inputs.cores_per_vm <= inputs.quota_cores
    if inputs.items:
        assert fleet.total_nodes >= 1
        assert fleet.est_makespan_s == makespan_s(
            inputs.items, fleet.total_nodes, inputs.sec_per_item, inputs.startup_s
        )
        assert fleet.est_makespan_s >= inputs.startup_s + inputs.sec_per_item
    else:
        assert fleet.total_nodes == 0 and fleet.est_cost == 0


@settings(max_examples=300, deadline=None)
@given(plan_inputs(with_deadline=True))
def test_deadline_gets_the_nodes_it_needs_when_the_caps_allow(inputs: PlanInputs) -> None:
    fleet = fleet_or_none(inputs)
    assume(fleet is not None and inputs.items > 0)
    assert fleet is not None and inputs.target_s is not None
    needed = brute_force_needed(inputs)
    if needed is not None:
        # The caps (quota included) allow a fleet that meets the deadline: the plan is at
        # least that big, and meets the target with start-up counted.
        assert fleet.total_nodes >= needed
        assert fleet.needed_nodes == needed
        assert fleet.est_makespan_s <= inputs.target_s
        assert fleet.binding_limit == "deadline"
    else:
        assert fleet.binding_limit != "deadline"
        assert fleet.est_makespan_s > inputs.target_s
        assert any("binding limit" in note for note in fleet.notes)


@given(plan_inputs())
def test_quota_below_one_vm_is_an_error_that_names_the_quota(inputs: PlanInputs) -> None:
    assume(inputs.items > 0)
    starved = replace(inputs, quota_cores=inputs.cores_per_vm - 1)
    with pytest.raises(PlanError, match="quota is the binding limit"):
        size_fleet(starved)


# -- cost and makespan move the right way ------------------------------------------------------
#
# With a deadline the planner minimizes cost among the fleets that meet it, so more work,
# slower items, longer start-up or a tighter deadline never make a deadline-meeting plan
# cheaper. Without a deadline (or when a cap stops it from meeting one) it minimizes the
# makespan instead, so there more work never finishes sooner and more quota never slows it;
# cost can then drop with more items (4 items on 2 nodes x 2 rounds cost less than 3 items
# on 3 nodes x 1 round), which is the speed the user asked for, not a planning error.


@settings(max_examples=200, deadline=None)
@given(plan_inputs(with_deadline=True), st.integers(min_value=1, max_value=5000))
def test_more_items_never_cost_less(inputs: PlanInputs, extra: int) -> None:
    before, after = (
        fleet_or_none(inputs),
        fleet_or_none(replace(inputs, items=inputs.items + extra)),
    )
    assume(before is not None and after is not None and after.binding_limit == "deadline")
    assert after.est_cost >= before.est_cost


@settings(max_examples=200, deadline=None)
@given(plan_inputs(with_deadline=True), st.floats(min_value=1.0, max_value=5.0))
def test_slower_items_never_cost_less(inputs: PlanInputs, factor: float) -> None:
    slower = replace(inputs, sec_per_item=inputs.sec_per_item * factor)
    before, after = fleet_or_none(inputs), fleet_or_none(slower)
    assume(before is not None and after is not None and after.binding_limit == "deadline")
    assert after.est_cost >= before.est_cost


@settings(max_examples=200, deadline=None)
@given(plan_inputs(with_deadline=True), st.floats(min_value=0, max_value=1800))
def test_longer_startup_never_costs_less(inputs: PlanInputs, extra: float) -> None:
    before = fleet_or_none(inputs)
    after = fleet_or_none(replace(inputs, startup_s=inputs.startup_s + extra))
    assume(before is not None and after is not None and after.binding_limit == "deadline")
    assert after.est_cost >= before.est_cost


@settings(max_examples=200, deadline=None)
@given(plan_inputs(with_deadline=True), st.floats(min_value=0.2, max_value=1.0))
def test_tighter_deadline_never_costs_less(inputs: PlanInputs, factor: float) -> None:
    assert inputs.deadline_s is not None
    tighter = replace(inputs, deadline_s=inputs.deadline_s * factor)
    before, after = fleet_or_none(inputs), fleet_or_none(tighter)
    assume(before is not None and after is not None)
    # Holds on every path: a cap-bound plan uses a fleet from the looser plan's range.
    assert after.est_cost >= before.est_cost
    if after.binding_limit == "deadline":
        assert after.needed_nodes is not None and before.needed_nodes is not None
        assert after.needed_nodes >= before.needed_nodes


@settings(max_examples=200, deadline=None)
@given(plan_inputs(), st.integers(min_value=0, max_value=5000))
def test_more_quota_never_makes_the_run_slower(inputs: PlanInputs, extra: int) -> None:
    assume(inputs.quota_cores is not None)
    assert inputs.quota_cores is not None
    before = fleet_or_none(inputs)
    after = fleet_or_none(replace(inputs, quota_cores=inputs.quota_cores + extra))
    assume(before is not None and after is not None)
    assert after.est_makespan_s <= before.est_makespan_s


@settings(max_examples=200, deadline=None)
@given(plan_inputs(), st.integers(min_value=0, max_value=3000))
def test_more_max_nodes_never_makes_the_run_slower(inputs: PlanInputs, extra: int) -> None:
    before = fleet_or_none(inputs)
    after = fleet_or_none(replace(inputs, max_nodes=inputs.max_nodes + extra))
    assume(before is not None and after is not None)
    assert after.est_makespan_s <= before.est_makespan_s


@settings(max_examples=200, deadline=None)
@given(plan_inputs(with_deadline=False), st.integers(min_value=1, max_value=5000))
def test_without_deadline_more_work_never_finishes_sooner(inputs: PlanInputs, extra: int) -> None:
    before = fleet_or_none(inputs)
    more = fleet_or_none(replace(inputs, items=inputs.items + extra))
    slower = fleet_or_none(replace(inputs, sec_per_item=inputs.sec_per_item * 1.5))
    assume(before is not None and more is not None and slower is not None)
    assert more.est_makespan_s >= before.est_makespan_s
    assert slower.est_makespan_s >= before.est_makespan_s


@given(plan_inputs(), st.floats(min_value=1.0, max_value=10.0))
def test_cost_scales_with_price(inputs: PlanInputs, factor: float) -> None:
    before = fleet_or_none(inputs)
    after = fleet_or_none(replace(inputs, price_per_hour=inputs.price_per_hour * factor))
    assume(before is not None and after is not None)
    assert after.est_cost >= before.est_cost


def test_low_priority_is_cheaper_than_dedicated_at_table_prices() -> None:
    for size in KNOWN_VM_SIZES.values():
        assert size.low_priority_usd_per_hour < size.dedicated_usd_per_hour
        low = inputs_from_options(
            20_000, 20, RunOptions(vm_size=size.name, low_priority=True, deadline_s=7200)
        )
        dedicated = replace(low, low_priority=False, price_per_hour=size.dedicated_usd_per_hour)
        assert size_fleet(low).est_cost < size_fleet(dedicated).est_cost


def test_cost_formula_bills_each_node_for_its_own_job() -> None:
    # 1,000 items on 10 nodes: every node does 100 rounds, ends at 2,300 s and exits 60 s
    # later (idle exit); + 120 s scale-down: 10 x 2,480 = 24,800 node-s at $1/h.
    assert makespan_s(1000, 10, 20, 300) == 2300
    cost = cost_usd(1000, 10, 20, 300, price_per_hour=1.0, scale_down_s=120)
    assert cost == pytest.approx(24_800 / 3600)
    # No idle linger at all: start-up + own items + scale-down per node, nothing more.
    bare = billed_node_seconds(1000, 10, 20, 300, 120, idle_exit_s=0, visibility_timeout_s=0)
    assert bare == 10 * (300 + 120) + 1000 * 20


def test_a_node_with_less_work_is_billed_less_than_the_busiest() -> None:
    # 1,005 items on 10 nodes: 5 nodes do 101 items (end 2,320 s), 5 do 100 (idle at
    # 2,300 s). With items of 20 s and no visibility linger, those 5 leave after their own
    # 60 s idle exit, at 2,360 s, not with the busiest at 2,380 s as one multi-node job would.
    seconds = billed_node_seconds(1005, 10, 20, 300, 0, idle_exit_s=60, visibility_timeout_s=0)
    assert seconds == 5 * (2320 + 60) + 5 * (2300 + 60)
    gang = 10 * (makespan_s(1005, 10, 20, 300) + 60)  # the old multi-node-job bill
    assert seconds < gang
    # Lingering while messages are in flight is bounded by the end of the run.
    assert node_leaves_at(2300, 2320, 60, 120) == 2360
    assert node_leaves_at(1000, 2320, 60, 120) == 1180
    assert node_leaves_at(2200, 2320, 60, 120) == 2320


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=1, max_value=5000),
    st.integers(min_value=1, max_value=500),
    st.floats(min_value=0.5, max_value=120),
    st.floats(min_value=0, max_value=900),
    st.floats(min_value=0, max_value=300),
    st.floats(min_value=0, max_value=600),
)
def test_per_node_billing_never_exceeds_the_multi_node_job_bill(
    items: int, nodes: int, spi: float, startup: float, idle_exit: float, visibility: float
) -> None:
    assume(nodes <= items)
    seconds = billed_node_seconds(
        items, nodes, spi, startup, 120, idle_exit_s=idle_exit, visibility_timeout_s=visibility
    )
    upper = nodes * (makespan_s(items, nodes, spi, startup) + idle_exit + 120)
    lower = nodes * (startup + 120) + items * spi
    assert lower - 1e-6 <= seconds <= upper + 1e-6


# -- worked examples --------------------------------------------------------------------------


def test_twenty_thousand_videos_in_two_hours() -> None:
    inputs = inputs_from_options(20_000, 20, RunOptions(deadline_s=7200))
    fleet = size_fleet(inputs)
    assert fleet.binding_limit == "deadline"
    assert fleet.est_makespan_s <= 7200 * 0.9  # headroom kept
    assert fleet.est_makespan_s >= inputs.startup_s + 20 * math.ceil(20_000 / fleet.total_nodes)
    assert fleet.total_nodes == nodes_needed(20_000, 20, inputs.startup_s, 7200 * 0.9)


def test_quota_binding_note_says_by_how_much() -> None:
    inputs = PlanInputs(
        items=20_000, sec_per_item=20, deadline_s=7200, quota_cores=48, cores_per_vm=4
    )
    fleet = size_fleet(inputs)
    assert fleet.binding_limit == "quota"
    assert fleet.total_nodes == 12
    note = next(note for note in fleet.notes if "binding limit" in note)
    assert "48 cores" in note and "allow 12 nodes" in note and "needs 65" in note


def test_no_deadline_uses_the_fleet_but_not_idle_nodes() -> None:
    fleet = size_fleet(PlanInputs(items=150, sec_per_item=20, max_nodes=100))
    # 100 nodes would take 2 rounds; 75 take the same 2 rounds for less money.
    assert fleet.total_nodes == 75
    assert fleet.binding_limit == "max_nodes"


def test_few_items_bind_the_fleet() -> None:
    fleet = size_fleet(PlanInputs(items=7, sec_per_item=20))
    assert fleet.total_nodes == 7
    assert fleet.binding_limit == "items"


def test_unreachable_deadline_is_explained() -> None:
    fleet = size_fleet(PlanInputs(items=100, sec_per_item=600, startup_s=300, deadline_s=600))
    assert fleet.binding_limit != "deadline"
    assert any("cannot be met at any fleet size" in note for note in fleet.notes)


def test_no_items_no_plan() -> None:
    fleet = size_fleet(PlanInputs(items=0, sec_per_item=20, deadline_s=60))
    assert fleet.total_nodes == 0
    assert fleet.binding_limit == "none"


def test_plan_run_builds_a_valid_run_plan() -> None:
    plan = plan_run("run-7", PlanInputs(items=25_000, sec_per_item=20, max_nodes=250))
    assert isinstance(plan, RunPlan)
    assert [cluster.nodes for cluster in plan.clusters] == [84, 83, 83]
    assert plan.total_nodes == 250
    assert len({cluster.name for cluster in plan.clusters}) == 3
    assert RunPlan.model_validate(plan.model_dump(mode="json")) == plan


@given(
    st.from_regex(r"[a-z0-9]+(-[a-z0-9]+)*", fullmatch=True).filter(lambda s: len(s) <= 40),
    st.integers(min_value=0, max_value=999),
)
def test_cluster_names_are_valid_aml_names(run_id: str, index: int) -> None:
    name = cluster_name(run_id, index)
    # AML compute names: 2-16 letters, digits and dashes, starting with a letter and ending
    # with a letter or digit.
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,14}[A-Za-z0-9]", name)
    assert name == cluster_name(run_id, index)
    assert name != cluster_name(run_id, (index + 1) % 1000)


def test_invalid_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="sec_per_item"):
        PlanInputs(items=1, sec_per_item=0)
    with pytest.raises(ValueError, match="max_nodes_per_cluster"):
        PlanInputs(items=1, sec_per_item=1, max_nodes_per_cluster=101)


def test_vm_table_lookup_ignores_case() -> None:
    size = find_vm_size("standard_nc4as_t4_v3")
    assert size is not None and size.cores == 4 and size.gpus == 1
    assert find_vm_size("Standard_Unknown") is None


def test_inputs_from_options_needs_cores_for_an_unknown_size_with_quota() -> None:
    options = RunOptions(vm_size="Standard_Mystery")
    with pytest.raises(ValueError, match="cores per VM"):
        inputs_from_options(10, 1, options, quota_cores=100)
    assert inputs_from_options(10, 1, options, quota_cores=100, cores_per_vm=8).quota_nodes == 12
    assert inputs_from_options(10, 1, options, price_per_hour=2.0).price_per_hour == 2.0


# -- durations ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("90s", 90),
        ("5m", 300),
        ("2h", 7200),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("1h0m30s", 3630),
        (" 2H ", 7200),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "1m2h", "1h1h", "2 h", "-5m", "1d", "5m3"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert format_duration(6460) == "1h47m40s"
    assert format_duration(7200) == "2h"
    assert format_duration(0) == "0s"


# -- simulation ---------------------------------------------------------------------------------

sim_inputs = st.builds(
    SimulationInputs,
    items=st.integers(min_value=0, max_value=600),
    nodes=st.integers(min_value=1, max_value=40),
    sec_per_item=st.floats(min_value=1, max_value=120),
    startup_s=st.floats(min_value=0, max_value=600),
    sigma=st.floats(min_value=0, max_value=1.5),
    preemptions_per_node_hour=st.sampled_from([0.0, 0.1, 1.0, 5.0]),
    visibility_timeout_s=st.floats(min_value=0, max_value=600),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)


@settings(max_examples=150, deadline=None)
@given(sim_inputs)
def test_simulation_is_deterministic_and_never_beats_the_ideal(inputs: SimulationInputs) -> None:
    first = simulate(inputs)
    assert simulate(inputs) == first
    assert first.makespan_s >= first.ideal_s - 1e-9 * max(1.0, first.ideal_s)
    if inputs.items:
        assert first.makespan_s >= inputs.startup_s
    if inputs.preemptions_per_node_hour == 0:
        assert first.preemptions == 0 and first.redeliveries == 0


@given(
    st.integers(min_value=1, max_value=2000),
    st.integers(min_value=1, max_value=100),
    st.floats(min_value=1, max_value=60),
    st.floats(min_value=0, max_value=600),
)
def test_simulation_without_noise_matches_the_closed_form(
    items: int, nodes: int, sec_per_item: float, startup: float
) -> None:
    result = simulate(
        SimulationInputs(
            items=items, nodes=nodes, sec_per_item=sec_per_item, startup_s=startup, sigma=0
        )
    )
    assert result.makespan_s == pytest.approx(makespan_s(items, nodes, sec_per_item, startup))
    # Each node is billed for its own job, as the closed form bills it.
    assert result.node_seconds == pytest.approx(
        billed_node_seconds(items, nodes, sec_per_item, startup, DEFAULT_SCALE_DOWN_S)
    )


def test_simulated_nodes_leave_as_they_run_out_of_work() -> None:
    # Heavy-tailed items (this seed: a few items of many minutes) hold a few nodes long
    # after the queue is empty. The other nodes' jobs end within idle exit + visibility
    # timeout of going idle, so the bill is far under every node held to the end (one
    # multi-node job: all nodes until its last process exits, + scale-down).
    inputs = SimulationInputs(
        items=400, nodes=20, sec_per_item=60, startup_s=300, sigma=1.5, seed=1
    )
    result = simulate(inputs)
    one_job = inputs.nodes * (result.makespan_s + inputs.idle_exit_s + inputs.scale_down_s)
    assert result.node_seconds < 0.5 * one_job
    assert result.node_seconds >= inputs.nodes * (inputs.startup_s + inputs.scale_down_s)


def test_simulation_restarts_the_fleet_when_an_item_returns_after_every_node_left() -> None:
    # One node, preempted often, no linger: a returning item finds no node and the monitor
    # starts the fleet again; every item still finishes.
    inputs = SimulationInputs(
        items=30,
        nodes=2,
        sec_per_item=60,
        startup_s=10,
        sigma=0,
        preemptions_per_node_hour=20,
        idle_exit_s=0,
        visibility_timeout_s=300,
        seed=1,
    )
    result = simulate(inputs)
    assert result.redeliveries > 0
    assert result.makespan_s >= result.ideal_s


def test_preemption_and_heavy_tails_cost_time_on_average() -> None:
    calm = SimulationInputs(items=2000, nodes=20, sec_per_item=20, startup_s=300, sigma=0)
    rough = replace(calm, sigma=1.0, preemptions_per_node_hour=2.0)
    calm_span = simulate(calm).makespan_s
    rough_spans = [simulate(replace(rough, seed=seed)).makespan_s for seed in range(10)]
    assert sum(rough_spans) / len(rough_spans) > calm_span
    assert sum(simulate(replace(rough, seed=s)).preemptions for s in range(10)) > 0


def test_simulation_gives_up_when_preemption_prevents_progress() -> None:
    hopeless = SimulationInputs(
        items=10, nodes=1, sec_per_item=3600, startup_s=10, sigma=0, preemptions_per_node_hour=60
    )
    with pytest.raises(RuntimeError, match="did not finish"):
        simulate(hopeless, max_events=10_000)


# -- the per-video-second model -----------------------------------------------------------------

STRAGGLER_MANIFEST = [300.0] * 20 + [3000.0]  # 20 five-minute videos and one of fifty minutes


def _media_inputs(
    durations: Sequence[float | None], segment_s: float | None = None, **overrides: Any
) -> PlanInputs:
    """Inputs for videos of these durations at 1 node-second per video second."""
    media = media_work(durations, segment_s)
    fields: dict[str, Any] = {"sec_per_item": 0.0, "sec_per_video_s": 1.0, "startup_s": 300}
    return PlanInputs(items=media.items, media=media, **{**fields, **overrides})


def test_segment_pieces_follow_the_workers_rule() -> None:
    assert segment_pieces(3000, None) == (1, 3000)
    assert segment_pieces(300, 300) == (1, 300)  # no longer than one segment: not split
    assert segment_pieces(3000, 300) == (10, 300)
    assert segment_pieces(3050, 300) == (11, 300)  # the last piece runs to the end: 50 s
    # Past the segment cap the pieces grow: the last one takes what the cap leaves.
    count, longest = segment_pieces(30_000, 2)
    assert count == MAX_SEGMENTS_PER_ITEM and longest == pytest.approx(30_000 - 9_999 * 2)


def test_media_work_counts_pieces_and_fills_unknown_rows_with_the_mean() -> None:
    work = media_work([100.0, 300.0, None], segment_s=150)
    assert (work.items, work.estimated) == (3, 1)
    # 100 s is one piece, 300 s two, the unknown row counts as the mean 200 s: two.
    assert work.pieces == 5
    assert work.media_s == pytest.approx(600)
    assert work.longest_item_s == 300 and work.longest_piece_s == 150
    with pytest.raises(ValueError, match="none of 2 rows"):
        media_work([None, None])
    with pytest.raises(ValueError, match="finite"):
        media_work([float("nan")])


def test_list_schedule_window_is_the_graham_bound() -> None:
    # 9,000 s of work, the longest piece 3,000 s: (9000 - 3000) / n + 3000.
    assert list_schedule_window_s(9000, 3000, 21, 1) == pytest.approx(9000)
    assert list_schedule_window_s(9000, 3000, 21, 4) == pytest.approx(4500)
    # A node per piece: nobody waits, the longest piece is the window.
    assert list_schedule_window_s(9000, 3000, 21, 21) == 3000
    assert list_schedule_window_s(9000, 3000, 21, 50) == 3000


def test_the_long_video_binds_without_segments_and_the_note_suggests_them() -> None:
    fleet = size_fleet(_media_inputs(STRAGGLER_MANIFEST))
    # 21 nodes, one video each: the fifty-minute one sets the makespan.
    assert fleet.total_nodes == 21
    assert fleet.est_makespan_s == pytest.approx(300 + 3000)
    assert fleet.straggler is True
    assert fleet.longest_piece_s == pytest.approx(3000)
    note = next(n for n in fleet.notes if "straggler" in n)
    assert "--segment-seconds" in note


def test_with_segments_the_long_video_no_longer_binds() -> None:
    fleet = size_fleet(_media_inputs(STRAGGLER_MANIFEST, segment_s=300))
    # The long video is ten 300 s pieces: 30 pieces of equal length, one a node.
    assert fleet.total_nodes == 30
    assert fleet.est_makespan_s == pytest.approx(300 + 300)
    assert fleet.straggler is False
    assert fleet.longest_piece_s == pytest.approx(300)
    assert not any("straggler" in note for note in fleet.notes)
    assert any("30 pieces" in note for note in fleet.notes)


def test_a_deadline_the_long_video_alone_misses_says_so() -> None:
    fleet = size_fleet(_media_inputs(STRAGGLER_MANIFEST, deadline_s=40 * 60, headroom=0.0))
    assert fleet.needed_nodes is None  # start-up + 3,000 s > 40 min whatever the fleet
    assert any("cannot be met at any fleet size" in note for note in fleet.notes)
    assert fleet.straggler is True
    split = size_fleet(
        _media_inputs(STRAGGLER_MANIFEST, segment_s=300, deadline_s=40 * 60, headroom=0.0)
    )
    assert split.needed_nodes is not None and split.est_makespan_s <= 40 * 60


def test_the_deadline_sizes_the_fewest_nodes_within_the_bound() -> None:
    inputs = _media_inputs(STRAGGLER_MANIFEST, segment_s=300, deadline_s=3600, headroom=0.0)
    fleet = size_fleet(inputs)
    assert fleet.binding_limit == "deadline"
    assert fleet.needed_nodes is not None and fleet.est_makespan_s <= 3600
    # One node fewer than needed misses the target: 300 + (9000 - 300) / n + 300 > 3600.
    needed = fleet.needed_nodes
    assert 300 + 8700 / (needed - 1) + 300 > 3600 >= 300 + 8700 / needed + 300


def test_a_per_piece_overhead_adds_to_every_piece() -> None:
    plain = size_fleet(_media_inputs([600.0] * 4, max_nodes=1))
    overhead = size_fleet(_media_inputs([600.0] * 4, max_nodes=1, sec_per_item=30.0))
    assert plain.est_makespan_s == pytest.approx(300 + 2400)
    assert overhead.est_makespan_s == pytest.approx(300 + 2400 + 4 * 30)


@given(
    durations=st.lists(st.floats(min_value=0, max_value=4 * 3600), min_size=1, max_size=40),
    segment=st.one_of(st.none(), st.floats(min_value=1, max_value=3600)),
    max_nodes=st.integers(min_value=1, max_value=60),
    deadline=deadlines,
)
@settings(max_examples=150, deadline=None)
def test_media_plans_never_beat_the_straggler_or_the_even_share(
    durations: list[float], segment: float | None, max_nodes: int, deadline: float | None
) -> None:
    inputs = _media_inputs(durations, segment, max_nodes=max_nodes, deadline_s=deadline)
    assert inputs.media is not None
    fleet = size_fleet(inputs)
    nodes = fleet.total_nodes
    assert 1 <= nodes <= min(inputs.media.pieces, max_nodes)
    work = inputs.media.media_s
    window = fleet.est_makespan_s - inputs.startup_s
    # The lower bound of any schedule: the longest piece, and the work spread evenly.
    assert window >= inputs.media.longest_piece_s - 1e-6
    assert window >= work / nodes - 1e-6
    # A met deadline target is met by the plan's own makespan.
    if fleet.binding_limit == "deadline":
        assert inputs.target_s is not None and fleet.est_makespan_s <= inputs.target_s + 1e-6


def test_per_item_inputs_are_unchanged_by_the_media_fields() -> None:
    with pytest.raises(ValueError, match="sec_per_item must be > 0"):
        PlanInputs(items=3, sec_per_item=0.0)
    with pytest.raises(ValueError, match="go together"):
        PlanInputs(items=1, sec_per_item=1.0, sec_per_video_s=2.0)
    with pytest.raises(ValueError, match=r"media\.items"):
        PlanInputs(items=2, sec_per_item=0.0, sec_per_video_s=1.0, media=media_work([5.0]))
