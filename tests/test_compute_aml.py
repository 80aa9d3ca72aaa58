"""The AML backends offline: real SDK entities, fakes only where the network would be.

The v2 (azure-ai-ml) builders return real ``AmlCompute``, ``Environment`` and ``Command``
objects, and their REST translation is checked too. The backend talks to a fake MLClient
whose ``compute`` and ``jobs`` operations keep what they are given; quota listings are real
SDK ``Usage`` / ``VmSize`` entities parsed from the REST API's documented example payloads.
The v1 (azureml-core) builders return real provisioning configurations, Environments and
ScriptRunConfigs; its gateway talks to fake ``V1Workspace`` calls. Both gateways sit under
the one ``AmlBackend``. The fakes live in
tests/test_compute_contract.py, whose harnesses run the shared contract on them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest

pytest.importorskip(
    "azure.ai.ml", reason="the aml extra (azure-ai-ml) is not installed: pip install -e '.[aml]'"
)

from azure.ai.ml import PyTorchDistribution
from azure.ai.ml.entities import (
    AmlCompute,
    Command,
    Environment,
    ManagedIdentityConfiguration,
)
from azure.core.exceptions import HttpResponseError

from batchctl.compute.aml import AmlBackend, AmlSettings, NodeLaunch, quota_from_listings
from batchctl.compute.aml.gateway import (
    TAG_ATTEMPT,
    TAG_CLUSTER,
    TAG_CLUSTER_NODES,
    TAG_NODE,
    map_aml_status,
)
from batchctl.compute.aml.gateway_v2 import (
    build_cluster,
    build_environment,
    build_job,
    create_aml_backend,
    v2_backend,
)
from batchctl.compute.base import (
    TAG_RUN_ID,
    TASK_OPTIONS_ENV,
    ComputeError,
    ForeignComputeError,
    JobState,
)
from batchctl.contracts import MediaSummary, NodeSpec, RunOptions, RunPlan
from batchctl.planning import PlanInputs, media_work_of, packed, plan_run
from batchctl.settings import AZURITE_ACCOUNT_KEY
from tests.test_compute_contract import (
    CLIENT_ID,
    IDENTITY_ID,
    IMAGE,
    RUN_ID,
    STORAGE,
    FakeMLClient,
    FakeV1Workspace,
    aml_settings,
    make_plan,
    sdk_sizes,
    sdk_usages,
    size_records,
)


def small_plan(run_id: str = RUN_ID, nodes: int = 7) -> RunPlan:
    """A fleet of 7 nodes in clusters of at most 3: 3 + 2 + 2, one job per node."""
    return plan_run(
        run_id,
        PlanInputs(items=1000, sec_per_item=20, max_nodes=nodes, max_nodes_per_cluster=3),
    )


def aml_backend(**overrides: Any) -> tuple[AmlBackend, FakeMLClient]:
    client = FakeMLClient()
    return v2_backend(client, STORAGE, aml_settings(**overrides)), client


# == v2: builders =================================================================================


def test_cluster_entity_fields() -> None:
    plan = make_plan(nodes=84)
    cluster = plan.clusters[0]
    entity = build_cluster(cluster, RUN_ID, identity_resource_id=IDENTITY_ID)
    assert isinstance(entity, AmlCompute)
    assert entity.name == cluster.name
    assert entity.size == "Standard_NC4as_T4_v3"
    assert entity.tier == "low_priority"
    assert entity.min_instances == 0
    assert entity.max_instances == 84
    assert entity.idle_time_before_scale_down == 120
    assert entity.tags is not None and entity.tags[TAG_RUN_ID] == RUN_ID
    identity = entity.identity
    assert identity is not None and identity.type == "user_assigned"
    assert identity.user_assigned_identities is not None
    assert identity.user_assigned_identities[0].resource_id == IDENTITY_ID
    # And what goes over the wire.
    wire: Any = entity._to_rest_object()
    rest = wire.properties.properties
    assert str(rest.vm_priority.value) == "LowPriority"
    assert rest.scale_settings.min_node_count == 0
    assert rest.scale_settings.max_node_count == 84
    assert rest.scale_settings.node_idle_time_before_scale_down.total_seconds() == 120


def test_dedicated_cluster_without_identity() -> None:
    cluster = make_plan(nodes=5, low_priority=False).clusters[0]
    entity = build_cluster(cluster, RUN_ID, idle_time_before_scale_down_s=300)
    assert entity.tier == "dedicated"
    assert entity.identity is None
    assert entity.idle_time_before_scale_down == 300


def test_environment_is_the_prebuilt_image_with_no_build() -> None:
    environment = build_environment(IMAGE)
    assert isinstance(environment, Environment)
    assert environment.image == IMAGE
    assert environment.conda_file is None
    assert environment.build is None
    with pytest.raises(ValueError, match="image"):
        build_environment("")


def launch(options: RunOptions | None = None, **overrides: Any) -> NodeLaunch:
    built = NodeLaunch.from_settings(
        STORAGE, RUN_ID, options or RunOptions(processes_per_node=2), identity_client_id=CLIENT_ID
    )
    return built.model_copy(update=overrides) if overrides else built


def assert_no_secret(environment: Mapping[str, str]) -> None:
    for value in environment.values():
        assert AZURITE_ACCOUNT_KEY not in value
        assert "AccountKey" not in value
        assert "sig=" not in value
    assert not any("KEY" in name or "SECRET" in name for name in environment)


def test_job_entity_fields() -> None:
    cluster = make_plan().clusters[1]
    options = RunOptions(processes_per_node=2, fps=2.0)
    job = build_job(cluster, launch(options), image=IMAGE, node=5, attempt=0)
    assert isinstance(job, Command)
    assert job.name == f"{RUN_ID}-{cluster.name}-n5-0"
    assert job.compute == cluster.name
    # One node a job: it starts when that node is allocated, not when all of them are.
    assert job.resources.instance_count == 1
    assert isinstance(job.distribution, PyTorchDistribution)
    assert job.distribution.process_count_per_instance == 2
    assert job.command == "python -m worker"
    assert job.environment.image == IMAGE
    assert isinstance(job.identity, ManagedIdentityConfiguration)
    assert job.identity.client_id == CLIENT_ID
    assert job.tags is not None and job.tags[TAG_RUN_ID] == RUN_ID
    assert (job.tags[TAG_CLUSTER], job.tags[TAG_NODE], job.tags[TAG_ATTEMPT]) == (
        cluster.name,
        "5",
        "0",
    )
    assert job.tags[TAG_CLUSTER_NODES] == str(cluster.nodes)
    env = job.environment_variables
    assert env is not None
    assert env["BATCHCTL_STORAGE_AUTH"] == "managed_identity"
    assert env["BATCHCTL_BLOB_URL"] == STORAGE.blob_url
    assert env["BATCHCTL_QUEUE_URL"] == STORAGE.queue_url
    assert env["BATCHCTL_TABLE_URL"] == STORAGE.table_url
    assert env["BATCHCTL_RUN_ID"] == RUN_ID
    assert env["AZURE_CLIENT_ID"] == CLIENT_ID
    # The job's node spec, once per job: the node learns everything it needs from it.
    assert NodeSpec.model_validate(json.loads(env[TASK_OPTIONS_ENV])) == options.node_spec()
    assert "BATCHCTL_IDLE_EXIT_S" not in env  # idle exit arrives one way: in the spec
    assert_no_secret(env)
    rest: Any = job._to_job()._to_rest_object().properties
    assert rest.resources.instance_count == 1
    assert str(rest.distribution.distribution_type) in {"PyTorch", "DistributionType.PY_TORCH"}
    assert rest.environment_variables == env


def test_job_refuses_key_based_storage_and_slots_outside_the_cluster() -> None:
    cluster = make_plan().clusters[0]
    with pytest.raises(ComputeError, match="never with a key"):
        build_job(cluster, launch(storage_auth="azurite"), image=IMAGE)
    with pytest.raises(ValueError, match="not a slot"):
        build_job(cluster, launch(), image=IMAGE, node=cluster.nodes)


def all_aml_statuses() -> list[str]:
    try:
        from azure.ai.ml._restclient.arm_ml_service.models import JobStatus

        return [status.value for status in JobStatus]
    except ImportError:  # the SDK moved its internals; the documented words then
        return ["NotStarted", "Starting", "Provisioning", "Preparing", "Queued", "Running",
                "Finalizing", "CancelRequested", "Completed", "Failed", "Canceled",
                "NotResponding", "Paused", "Unknown"]  # fmt: skip


def test_every_aml_status_maps_to_our_states() -> None:
    expected_final = {"Completed": "completed", "Failed": "failed", "Canceled": "cancelled"}
    for status in all_aml_statuses():
        state = map_aml_status(status)
        assert isinstance(state, JobState)
        if status in expected_final:
            assert state.value == expected_final[status]
        else:
            assert state.active, status  # not final: nodes may still be held
    assert map_aml_status("Running") is JobState.RUNNING
    assert map_aml_status("Queued") is JobState.QUEUED
    assert map_aml_status("something new") is JobState.QUEUED
    assert map_aml_status(None) is JobState.QUEUED


# == quota =======================================================================================


def test_quota_from_real_sdk_usage_entities_dedicated() -> None:
    quota = quota_from_listings(
        "Standard_NC4as_T4_v3", low_priority=False, sizes=sdk_sizes(), usages=sdk_usages()
    )
    # The family limit (48, 8 used) binds before the regional total (100, 14 used); the
    # workspace-level record (48 of 48) is ignored.
    assert (quota.limit_cores, quota.used_cores) == (48, 8)
    assert quota.available_cores == 40
    assert quota.nodes_allowed == 10
    assert quota.cores_per_vm == 4 and quota.gpus_per_vm == 1
    assert quota.family == "standardNCASv3_T4Family"
    assert quota.price_per_hour == 0.53


def test_quota_low_priority_uses_the_regional_low_priority_total() -> None:
    quota = quota_from_listings(
        "standard_nc4as_t4_v3", low_priority=True, sizes=sdk_sizes(), usages=sdk_usages()
    )
    assert (quota.limit_cores, quota.used_cores) == (50, 18)
    assert quota.nodes_allowed == 8
    assert quota.price_per_hour == 0.11


def test_quota_errors_and_unknowns() -> None:
    with pytest.raises(ComputeError, match="not offered"):
        quota_from_listings("Standard_ND96asr_v4", low_priority=False, sizes=sdk_sizes(), usages=[])
    no_records = quota_from_listings(
        "Standard_NC4as_T4_v3", low_priority=False, sizes=sdk_sizes(), usages=[]
    )
    assert no_records.available_cores is None
    assert any("quota not applied" in note for note in no_records.notes)
    incapable = [dict(size_records()[0], lowPriorityCapable=False)]
    with pytest.raises(ComputeError, match="low priority"):
        quota_from_listings("Standard_NC4as_T4_v3", low_priority=True, sizes=incapable, usages=[])


def test_backend_reads_quota_and_plans_within_it() -> None:
    backend, _ = aml_backend()
    quota = backend.read_quota("Standard_NC4as_T4_v3", low_priority=True)
    assert quota.nodes_allowed == 8
    plan = backend.plan(RUN_ID, 20_000, RunOptions(deadline_s=7200))
    assert plan.total_nodes == 8
    assert plan.binding_limit == "quota"
    assert any("quota is the binding limit" in note for note in plan.notes)
    # Messages of 4 items take 4 x sec_per_item each.
    batched = backend.plan(RUN_ID, 100, RunOptions(mini_batch_size=4))
    assert batched.est_makespan_s == pytest.approx(300 + 4 * 20 * 13)


# == v2: backend behaviour =======================================================================


def test_ensure_is_idempotent_and_refuses_foreign_names() -> None:
    backend, client = aml_backend()
    plan = make_plan()
    first = backend.ensure_clusters(RUN_ID, plan)
    creates = [call for call in client.compute.calls if call[0] == "create_or_update"]
    assert len(creates) == 3
    second = backend.ensure_clusters(RUN_ID, plan)
    assert [call for call in client.compute.calls if call[0] == "create_or_update"] == creates
    assert [c.name for c in second] == [c.name for c in first]
    assert all(c.run_id == RUN_ID and c.max_nodes for c in second)

    other, other_client = aml_backend()
    other_client.compute.add_foreign(plan.clusters[0].name, {"owner": "someone"})
    with pytest.raises(ForeignComputeError):
        other.ensure_clusters(RUN_ID, plan)
    assert other_client.compute.computes[plan.clusters[0].name].tags == {"owner": "someone"}


def test_ensure_resizes_this_runs_cluster() -> None:
    backend, client = aml_backend()
    backend.ensure_clusters(RUN_ID, make_plan(nodes=50))
    backend.ensure_clusters(RUN_ID, make_plan(nodes=60))
    assert client.compute.computes[make_plan(nodes=60).clusters[0].name].max_instances == 60


def test_plans_must_use_planned_cluster_names() -> None:
    backend, _ = aml_backend()
    plan = make_plan(nodes=10)
    renamed = plan.model_copy(
        update={"clusters": [plan.clusters[0].model_copy(update={"name": "mycluster"})]}
    )
    with pytest.raises(ValueError, match="cluster_name"):
        backend.ensure_clusters(RUN_ID, renamed)


def test_submit_starts_one_single_node_job_per_node_slot() -> None:
    backend, client = aml_backend()
    plan = small_plan()
    assert [c.nodes for c in plan.clusters] == [3, 2, 2]
    backend.ensure_clusters(RUN_ID, plan)
    jobs = backend.submit_jobs(RUN_ID, plan, RunOptions())
    expected = [f"{RUN_ID}-{c.name}-n{n}-0" for c in plan.clusters for n in range(c.nodes)]
    assert [job.name for job in jobs] == expected
    assert [job.cluster for job in jobs] == [c.name for c in plan.clusters for _ in range(c.nodes)]
    assert all(stored.job.resources.instance_count == 1 for stored in client.jobs.jobs.values())
    again = backend.submit_jobs(RUN_ID, plan, RunOptions())  # a retried activity
    assert [job.name for job in again] == expected
    assert len(client.jobs.jobs) == 7


def test_submit_resubmits_only_the_slots_whose_job_ended() -> None:
    backend, client = aml_backend()
    plan = small_plan()
    backend.ensure_clusters(RUN_ID, plan)
    jobs = backend.submit_jobs(RUN_ID, plan, RunOptions())
    client.jobs.jobs[jobs[1].name].status = "Failed"  # node 1 of cluster 0 was preempted
    client.jobs.jobs[jobs[4].name].status = "Completed"  # a node that ran out of work
    client.jobs.jobs[jobs[2].name].status = "Running"
    creates = len([c for c in client.jobs.calls if c[0] == "create_or_update"])

    resubmitted = backend.submit_jobs(RUN_ID, plan, RunOptions())

    new = [c for c in client.jobs.calls if c[0] == "create_or_update"][creates:]
    assert sorted(name for _, name in new) == sorted(
        [jobs[1].name[:-1] + "1", jobs[4].name[:-1] + "1"]
    )
    assert [job.name for job in resubmitted] == [
        jobs[1].name[:-1] + "1" if i == 1 else jobs[4].name[:-1] + "1" if i == 4 else job.name
        for i, job in enumerate(jobs)
    ]
    states = {job.name: job for job in backend.job_states(RUN_ID)}
    assert len(states) == 7
    assert states[jobs[2].name].state is JobState.RUNNING
    assert states[jobs[2].name].detail == "Running"
    assert states[jobs[1].name[:-1] + "1"].state is JobState.QUEUED
    # A second backend (another host, no memory of attempts) sees the same latest jobs.
    fresh = v2_backend(client, STORAGE, aml_settings())
    assert fresh.job_states(RUN_ID) == backend.job_states(RUN_ID)


def test_job_states_find_every_slot_from_the_run_id_alone() -> None:
    backend, client = aml_backend()
    plan = small_plan()
    backend.ensure_clusters(RUN_ID, plan)
    submitted = backend.submit_jobs(RUN_ID, plan, RunOptions())
    backend.delete_clusters(RUN_ID)  # job states outlive the clusters
    fresh = v2_backend(client, STORAGE, aml_settings())
    assert [job.name for job in fresh.job_states(RUN_ID)] == [job.name for job in submitted]
    assert backend.job_states("never-ran") == []


def test_a_half_failed_submit_is_found_whole_and_completed_by_the_retry() -> None:
    backend, client = aml_backend()
    plan = small_plan()
    backend.ensure_clusters(RUN_ID, plan)
    original = client.jobs.create_or_update
    refused = f"{RUN_ID}-{plan.clusters[1].name}-n0-0"

    def refusing(job: Any) -> Any:
        if job.name == refused:
            raise RuntimeError("the PUT of one job failed")
        return original(job)

    client.jobs.create_or_update = refusing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="one job failed"):
        backend.submit_jobs(RUN_ID, plan, RunOptions())
    # Every other slot's job was started, in every cluster, and the run's listing finds
    # them all: no order of submission is needed for a job to be found.
    found = {job.name for job in backend.job_states(RUN_ID)}
    assert len(found) == 6 and refused not in found
    assert {job.cluster for job in backend.job_states(RUN_ID)} == {c.name for c in plan.clusters}
    client.jobs.create_or_update = original  # type: ignore[method-assign]
    retried = backend.submit_jobs(RUN_ID, plan, RunOptions())
    assert len(retried) == 7 and len(client.jobs.jobs) == 7
    assert [name for verb, name in client.jobs.calls if verb == "create_or_update"][-1] == refused


def test_a_poll_lists_pages_and_gets_no_job_by_name() -> None:
    # One listing by the run's tag key; pages of 100: a 250-node fleet is three requests.
    backend, client = aml_backend()
    plan = make_plan(nodes=250)
    backend.submit_jobs(RUN_ID, plan, RunOptions())
    other, _ = make_plan("run-other", nodes=10), None
    backend.submit_jobs("run-other", other, RunOptions())  # another run's jobs: not listed
    client.jobs.calls.clear()
    states = backend.job_states(RUN_ID)
    assert len(states) == 250
    assert client.jobs.calls == [("list", ""), ("list", "100"), ("list", "200")]


def test_a_plan_that_grew_keeps_its_jobs_and_gives_the_new_slots_theirs() -> None:
    # A later plan of the same run adds node slots (past a cluster's earlier node count,
    # and a new cluster): the listing finds every job, whatever the count tags said.
    backend, client = aml_backend()
    before = small_plan(nodes=4)
    after = small_plan(nodes=7)
    assert [c.name for c in after.clusters[: len(before.clusters)]] == [
        c.name for c in before.clusters
    ]
    first = backend.submit_jobs(RUN_ID, before, RunOptions())
    grown = backend.submit_jobs(RUN_ID, after, RunOptions())
    assert {job.name for job in first} < {job.name for job in grown}
    assert len(grown) == 7 and len(client.jobs.jobs) == 7
    assert [job.name for job in backend.job_states(RUN_ID)] == [job.name for job in grown]


def test_a_submit_whose_listing_lags_adopts_the_job_it_finds_by_name() -> None:
    # ARM's listing may not show a job PUT a moment ago; the retried submit then asks for a
    # name it made itself, ARM refuses it as taken, and the job of that name is the one.
    backend, client = aml_backend()
    plan = small_plan()
    first = backend.submit_jobs(RUN_ID, plan, RunOptions())
    hidden = first[3].name
    real_list = client.jobs.list

    def lagging(**kwargs: Any) -> Any:
        return [job for job in real_list(**kwargs) if job.name != hidden]

    client.jobs.list = lagging  # type: ignore[method-assign]
    again = backend.submit_jobs(RUN_ID, plan, RunOptions())
    assert [job.name for job in again] == [job.name for job in first]
    assert len(client.jobs.jobs) == 7  # nothing new was created
    # A PUT refused for a name that is not this run's job is an error, not an adoption.
    client.jobs.jobs[hidden].job.tags = {TAG_RUN_ID: "run-other"}
    with pytest.raises(HttpResponseError, match="already exists"):
        backend.submit_jobs(RUN_ID, plan, RunOptions())


def test_cancel_only_touches_active_jobs() -> None:
    backend, client = aml_backend()
    plan = small_plan()
    backend.ensure_clusters(RUN_ID, plan)
    jobs = backend.submit_jobs(RUN_ID, plan, RunOptions())
    client.jobs.jobs[jobs[0].name].status = "Completed"
    backend.cancel_jobs(RUN_ID)
    cancelled = [name for verb, name in client.jobs.calls if verb == "cancel"]
    assert sorted(cancelled) == sorted(job.name for job in jobs[1:])
    states = [job.state for job in backend.job_states(RUN_ID)]
    assert states == [JobState.COMPLETED] + [JobState.CANCELLED] * 6
    backend.cancel_jobs(RUN_ID)  # nothing left to cancel: no error
    assert len([c for c in client.jobs.calls if c[0] == "cancel"]) == 6


def test_delete_rechecks_the_tag_before_deleting() -> None:
    backend, client = aml_backend()
    plan = make_plan(nodes=10)
    backend.ensure_clusters(RUN_ID, plan)
    name = plan.clusters[0].name
    # The listing is stale: since it was read, the cluster was re-tagged by someone else.
    client.compute.stale_listing = copy.deepcopy(client.compute.computes)
    client.compute.computes[name].tags = {TAG_RUN_ID: "someone-else"}
    assert backend.delete_clusters(RUN_ID) == []
    assert name in client.compute.computes


def test_factory_builds_an_mlclient_without_network() -> None:
    class NoNetworkCredential:
        def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise AssertionError("building the backend must not fetch a token")

    backend = create_aml_backend(STORAGE, aml_settings(), credential=NoNetworkCredential())
    assert isinstance(backend, AmlBackend)
    assert backend.kind == "aml"


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHCTL_AML_SUBSCRIPTION_ID", "sub")
    monkeypatch.setenv("BATCHCTL_AML_RESOURCE_GROUP", "rg")
    monkeypatch.setenv("BATCHCTL_AML_WORKSPACE_NAME", "ws")
    monkeypatch.setenv("BATCHCTL_AML_NODE_IMAGE", IMAGE)
    monkeypatch.setenv("BATCHCTL_AML_SEC_PER_ITEM", "12.5")
    settings = AmlSettings()
    assert settings.workspace_name == "ws" and settings.sec_per_item == 12.5
    assert settings.idle_time_before_scale_down_s == 120
    monkeypatch.delenv("BATCHCTL_AML_NODE_IMAGE")
    with pytest.raises(ValueError, match="node_image"):
        AmlSettings()


# == one backend, two gateways ===================================================================


def test_the_backend_and_its_seam_import_no_sdk() -> None:
    # The ownership rules live above the gateways: a process on either SDK imports them
    # without the other SDK, and only gateway_v2 / gateway_v1 touch one.
    import subprocess
    import sys

    code = (
        "import sys, batchctl.compute.aml, batchctl.compute.aml.backend,"
        " batchctl.compute.aml.gateway, batchctl.compute.aml.quota, batchctl.compute.aml.settings;"
        "loaded = [m for m in sys.modules if m.startswith(('azure.ai', 'azureml'))];"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_job_states_follow_cluster_numbers_past_99_in_both_gateways(tmp_path: Any) -> None:
    # Cluster names end in their number ("-99", "-100"); by name "-100" sorts before "-11".
    azureml_core()
    plan = plan_run(
        RUN_ID,
        PlanInputs(
            items=100_000, sec_per_item=20, max_nodes=101, max_nodes_per_cluster=1, max_clusters=101
        ),
    )
    assert len(plan.clusters) == 101
    order = [cluster.name for cluster in plan.clusters]
    assert sorted(order) != order
    v2, _ = aml_backend()
    v1, _ = aml_v1_backend(tmp_path)
    for backend in (v2, v1):
        backend.submit_jobs(RUN_ID, plan, RunOptions())
        assert [job.cluster for job in backend.job_states(RUN_ID)] == order, backend.kind


# == v1 (azureml-core) ============================================================================


def azureml_core() -> Any:
    return pytest.importorskip(
        "azureml.core", reason="the aml-v1 extra (azureml-core) is not installed"
    )


def aml_v1_backend(tmp_path: Any = None, **overrides: Any) -> tuple[AmlBackend, FakeV1Workspace]:
    from batchctl.compute.aml.gateway_v1 import v1_backend

    workspace = FakeV1Workspace()
    source = str(tmp_path) if tmp_path is not None else None
    backend = v1_backend(workspace, STORAGE, aml_settings(**overrides), source_directory=source)
    return backend, workspace


def test_v1_module_imports_without_touching_azureml() -> None:
    import subprocess
    import sys

    code = (
        "import sys, batchctl, batchctl.compute.aml.gateway_v1, batchctl.compute.base;"
        "assert not any(m == 'azureml' or m.startswith('azureml.') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    from batchctl.compute.aml import gateway_v1

    assert gateway_v1.END_OF_SUPPORT == "2026-06-30"
    assert "2026-06-30" in (gateway_v1.__doc__ or "")


def test_v1_provisioning_configuration_fields() -> None:
    azureml_core()
    from batchctl.compute.aml.gateway_v1 import build_provisioning_config

    cluster = make_plan(nodes=84).clusters[0]
    config = build_provisioning_config(cluster, RUN_ID, identity_resource_id=IDENTITY_ID)
    assert type(config).__name__ == "AmlComputeProvisioningConfiguration"
    assert config.vm_size == "Standard_NC4as_T4_v3"
    assert config.vm_priority == "lowpriority"
    assert config.scale_settings.minimum_node_count == 0
    assert config.scale_settings.maximum_node_count == 84
    assert config.scale_settings.idle_seconds_before_scaledown == 120
    assert config.tags[TAG_RUN_ID] == RUN_ID
    assert config.identity_type == "UserAssigned"
    assert config.identity_id == [IDENTITY_ID]
    dedicated = build_provisioning_config(
        make_plan(nodes=3, low_priority=False).clusters[0], RUN_ID
    )
    assert dedicated.vm_priority == "dedicated"
    assert dedicated.identity_type is None


def test_v1_environment_and_script_run_config(tmp_path: Any) -> None:
    core = azureml_core()
    from batchctl.compute.aml.gateway_v1 import build_environment as build_v1_environment
    from batchctl.compute.aml.gateway_v1 import build_script_run_config

    environment = build_v1_environment(IMAGE)
    assert isinstance(environment, core.Environment)
    assert environment.docker.base_image == IMAGE
    assert environment.python.user_managed_dependencies is True

    cluster = make_plan().clusters[2]
    options = RunOptions(processes_per_node=2)
    config = build_script_run_config(
        cluster, launch(options), image=IMAGE, source_directory=str(tmp_path)
    )
    assert isinstance(config, core.ScriptRunConfig)
    assert config.command == ["python", "-m", "worker"]
    assert config.run_config.target == cluster.name
    assert config.run_config.node_count == 1  # one node a run
    assert config.run_config.framework == "PyTorch"
    pytorch = config.run_config.pytorch
    assert (pytorch.node_count, pytorch.process_count) == (1, 2)
    assert config.run_config.environment.docker.base_image == IMAGE
    env = config.run_config.environment_variables
    assert env["BATCHCTL_STORAGE_AUTH"] == "managed_identity"
    assert env["BATCHCTL_RUN_ID"] == RUN_ID
    assert NodeSpec.model_validate_json(env[TASK_OPTIONS_ENV]) == options.node_spec()
    assert_no_secret(env)
    with pytest.raises(ComputeError, match="never with a key"):
        build_script_run_config(
            cluster, launch(storage_auth="azurite"), image=IMAGE, source_directory=str(tmp_path)
        )


def test_v1_quota_from_its_own_listing_format() -> None:
    # SDK v1 lists sizes as {name, vCPUs, gpus, memoryGB, maxResourceVolumeMB}: no family,
    # so the known-size table supplies it.
    backend, workspace = aml_v1_backend()
    workspace.sizes = [
        {"name": "Standard_NC4as_T4_v3", "vCPUs": 4, "gpus": 1, "memoryGB": 28.0,
         "maxResourceVolumeMB": 180000},
    ]  # fmt: skip
    quota = backend.read_quota("Standard_NC4as_T4_v3", low_priority=False)
    assert quota.nodes_allowed == 10
    assert quota.family == "standardNCASv3_T4Family"
    assert quota.price_per_hour is None


def test_v1_backend_submits_once_per_node_slot_and_resubmits_ended_runs(tmp_path: Any) -> None:
    azureml_core()
    backend, workspace = aml_v1_backend(tmp_path)
    plan = small_plan()
    backend.ensure_clusters(RUN_ID, plan)
    jobs = backend.submit_jobs(RUN_ID, plan, RunOptions())
    assert len(jobs) == 7 and len(workspace.runs) == 7
    assert [job.cluster for job in jobs] == [c.name for c in plan.clusters for _ in range(c.nodes)]
    slots = {(run.tags[TAG_CLUSTER], run.tags[TAG_NODE]) for run in workspace.runs.values()}
    assert len(slots) == 7
    assert all(config.run_config.node_count == 1 for config in workspace.configs.values())
    assert backend.submit_jobs(RUN_ID, plan, RunOptions()) == jobs  # a retry submits nothing
    assert len(workspace.runs) == 7
    workspace.set_status(jobs[3].name, "Failed")  # one preempted node
    again = backend.submit_jobs(RUN_ID, plan, RunOptions())
    assert len(workspace.runs) == 8
    assert again[3].name != jobs[3].name
    assert again[:3] == jobs[:3] and again[4:] == jobs[4:]
    new_run = workspace.runs[again[3].name]
    # Slot 3 is node 0 of the second cluster (3 + 2 + 2): its attempt 1, same slot tags.
    assert (new_run.tags[TAG_CLUSTER], new_run.tags[TAG_NODE], new_run.tags[TAG_ATTEMPT]) == (
        plan.clusters[1].name,
        "0",
        "1",
    )
    states = {job.name: job.state for job in backend.job_states(RUN_ID)}
    assert len(states) == 7
    assert states[again[3].name] is JobState.QUEUED  # the new attempt is starting
    backend.cancel_jobs(RUN_ID)
    assert {job.state for job in backend.job_states(RUN_ID)} == {JobState.CANCELLED}


def test_v1_find_runs_reads_each_listed_run_from_the_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # azureml-core's get_status(), get_tags() and get_details() each ask the service again
    # (details also lists log artifacts): five requests a run, per poll. A listed Run holds
    # its page's RunDto, which status, tags and the dict form read without a request.
    azureml_core()
    import azureml.core

    from batchctl.compute.aml.gateway_v1 import WorkspaceCalls

    class ListedRun:
        def __init__(self, index: int) -> None:
            self.id = f"batchctl_{index}"
            self.status = "Running"
            self.tags = {TAG_RUN_ID: RUN_ID, TAG_CLUSTER: "c0", TAG_NODE: str(index)}
            self._run_dto = {"target": "c0", "status": "Running"}

        def __getattr__(self, name: str) -> Any:
            raise AssertionError(f"a listed run was asked for {name}: a request per run")

    asked: list[Mapping[str, str]] = []

    class ListingExperiment:
        def __init__(self, workspace: Any, name: str) -> None:
            assert name == "batchctl"

        def get_runs(self, tags: Mapping[str, str]) -> list[ListedRun]:
            asked.append(tags)
            return [ListedRun(index) for index in range(3)]

    monkeypatch.setattr(azureml.core, "Experiment", ListingExperiment)
    runs = WorkspaceCalls(workspace=None).find_runs("batchctl", {TAG_RUN_ID: RUN_ID})
    assert asked == [{TAG_RUN_ID: RUN_ID}]
    assert [(run.id, run.status, run.target, run.tags[TAG_NODE]) for run in runs] == [
        (f"batchctl_{index}", "Running", "c0", str(index)) for index in range(3)
    ]


def test_v1_a_throttled_listing_is_waited_out_then_reported_unknown(tmp_path: Any) -> None:
    from batchctl.compute.aml.gateway_v1 import AmlV1Gateway

    azureml_core()
    workspace = FakeV1Workspace()
    slept: list[float] = []
    now = [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    aml = aml_settings(arm_retry_budget_s=5)
    gateway = AmlV1Gateway(
        workspace, aml, source_directory=str(tmp_path), sleep=sleep, clock=lambda: now[0]
    )
    backend = AmlBackend(gateway, STORAGE, aml)
    plan = small_plan()
    backend.submit_jobs(RUN_ID, plan, RunOptions())
    workspace.throttle = 2  # two 429s with Retry-After: 2, then an answer
    assert len(backend.job_states(RUN_ID)) == 7
    assert slept == [2.0, 2.0]
    workspace.throttle = 100  # past the 5 s budget: the poll knows no jobs, and goes on
    slept.clear()
    assert backend.job_states(RUN_ID) == []
    assert slept == [2.0, 2.0]  # a third wait would end at 6 s


# == waiting out throttling (throttling.py) ======================================================


def test_wait_out_retries_only_transient_answers_and_honours_retry_after() -> None:
    from batchctl.compute.aml.throttling import Patience, retry_after_s, wait_out
    from tests.test_compute_contract import throttled_error

    slept: list[float] = []
    answers: list[Any] = [throttled_error("3"), throttled_error("4"), "listed"]

    def read() -> Any:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_out(read, Patience(budget_s=60), what="t", sleep=slept.append) == "listed"
    assert slept == [3.0, 4.0]
    # A refusal is no throttling: it goes through at once, without a wait.
    refused = HttpResponseError(message="(AuthorizationFailed) no")
    refused.status_code = 403

    def refusing() -> Any:
        raise refused

    with pytest.raises(HttpResponseError, match="AuthorizationFailed"):
        wait_out(refusing, Patience(budget_s=60), what="t", sleep=slept.append)
    assert slept == [3.0, 4.0]
    # Retry-After may be an HTTP date; without one, a full-jitter backoff under its cap.
    date = throttled_error("Sun, 06 Dec 2026 09:00:30 GMT")
    noon = datetime(2026, 12, 6, 9, 0, 0, tzinfo=UTC)
    assert retry_after_s(date, now=noon) == 30.0
    patience = Patience(budget_s=60, initial_backoff_s=1, backoff_cap_s=8)
    assert all(0 <= patience.backoff_s(n) <= min(8, 2**n) for n in range(10))


def test_v1_ensure_starts_every_create_before_awaiting_any(tmp_path: Any) -> None:
    # SDK v1 returns from ComputeTarget.create once the service accepted it and waits later:
    # the backend must start all clusters first (the same rule as v2's pollers).
    azureml_core()
    backend, workspace = aml_v1_backend(tmp_path)
    events: list[str] = []
    create = workspace.create_compute

    def recording_create(name: str, config: Any) -> Any:
        events.append(f"create {name}")
        finish = create(name, config)

        def wait() -> Any:
            events.append(f"wait {name}")
            return finish()

        return wait

    workspace.create_compute = recording_create  # type: ignore[method-assign]
    plan = make_plan()
    ensured = backend.ensure_clusters(RUN_ID, plan)
    assert sorted(c.name for c in ensured) == sorted(c.name for c in plan.clusters)
    assert all(c.state == "Succeeded" for c in ensured)
    creates = [i for i, event in enumerate(events) if event.startswith("create")]
    waits = [i for i, event in enumerate(events) if event.startswith("wait")]
    assert len(creates) == len(waits) == len(plan.clusters)
    assert max(creates) < min(waits)


def test_a_run_with_a_rate_per_video_second_is_planned_by_video_length() -> None:
    backend, _ = aml_backend()
    # 20 videos of 300 s and one of 3000 s, at 1 node-second per second of video.
    media = MediaSummary(
        items=21, pieces=21, media_s=9000, longest_piece_s=3000, longest_item_s=3000
    )
    options = RunOptions(sec_per_video_s=1.0)  # as many nodes as the quota allows: 8
    whole = backend.plan(RUN_ID, 21, options, media=media)
    # The longest video bounds the makespan: start-up + 3000 s, however many nodes.
    assert whole.est_makespan_s >= 300 + 3000
    assert any("straggler" in note and "--segment-seconds" in note for note in whole.notes)
    # Split at 300 s, the same work is 30 pieces of at most 300 s: no straggler to note.
    split = MediaSummary(
        items=21, pieces=30, media_s=9000, longest_piece_s=300, longest_item_s=3000, segment_s=300
    )
    planned = backend.plan(
        RUN_ID, 21, options.model_copy(update={"segment_seconds": 300}), media=split
    )
    assert planned.est_makespan_s < whole.est_makespan_s
    assert not any("straggler" in note for note in planned.notes)
    # Cells that were no duration are named; a rate without durations plans per item.
    named = backend.plan(
        RUN_ID,
        21,
        options,
        media=media.model_copy(update={"unreadable": 2, "unreadable_rows": [4, 9]}),
    )
    assert any("rows 4, 9" in note for note in named.notes)
    per_item = backend.plan(RUN_ID, 21, options)
    assert any("no duration_s column" in note for note in per_item.notes)


def test_a_plan_by_video_length_counts_messages_not_videos() -> None:
    """Nodes take whole messages: 320 videos of 20 s at 32 a message are 10 pieces of work
    (of 640 s each), never work for 100 nodes."""
    backend, _ = aml_backend()
    media = MediaSummary(items=320, pieces=320, media_s=6400, longest_piece_s=20, longest_item_s=20)
    options = RunOptions(sec_per_video_s=1.0, mini_batch_size=32, max_nodes=100)
    plan = backend.plan(RUN_ID, 10, options, media=media)
    assert plan.total_nodes <= 8  # the quota's 8 nodes, and no more than the 10 messages
    # Each message is 640 s of video: the busiest node works at least that long.
    assert plan.est_makespan_s >= 300 + 640
    # Segments travel one to a message: a split video's pieces stay pieces of their own.
    split = MediaSummary(
        items=2, pieces=11, media_s=1020, longest_piece_s=100, longest_item_s=1000,
        segment_s=100, split_items=1,
    )  # fmt: skip
    assert packed(media_work_of(split), 8).pieces == 11
