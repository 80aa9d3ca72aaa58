"""The merged output as a versioned AML data asset (``--register-output``, issue 26).

The v2 registration goes through azure-ai-ml's own ``MLClient.data`` pipeline with only the
HTTP exchange answered here, and the body it PUTs is compared with the SDK's own REST
serialisation of the entity ``build_data_asset`` builds. SDK v1 cannot register (its
datasets need azureml-dataprep) and says so. The record lands beside the merged output in
real storage (Azurite); the orchestrator's new step replays under the real Durable SDK at
both history schema versions; and a local run with the flag writes the would-be asset.
"""

from __future__ import annotations

import csv
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from pydantic import ValidationError

pytest.importorskip("azure.ai.ml", reason="the aml extra (azure-ai-ml) is not installed")

from batchctl.activity_names import Activity
from batchctl.commands.options import option_flags
from batchctl.compute.aml.gateway import DataAssetsUnsupportedError
from batchctl.compute.aml.gateway_v1 import V1_DATA_ASSETS_UNSUPPORTED, v1_backend
from batchctl.compute.aml.gateway_v2 import build_data_asset, v2_backend
from batchctl.compute.base import DataAssetRegistrar, DataAssetRequest
from batchctl.contracts import (
    DataAssetRegistration,
    MergeSummary,
    RunOptions,
    RunRequest,
    RunState,
)
from batchctl.data_assets import (
    TAG_MANIFEST,
    TAG_MODEL,
    asset_request,
    read_registration,
    record_blob_name,
    register_merged_output,
)
from batchctl.services import Services
from orchestrators.run import RETRY_MAX_ATTEMPTS, run_orchestrator
from tests.durable_replay import SCHEMA_V2, SCHEMA_V3, ActivityOutcome, ReplayDriver
from tests.test_compute_aml_transport import (
    ARM,
    WORKSPACE_ID,
    RecordingAdapter,
    Reply,
    is_workspace_get,
    ml_client,
    not_found,
    workspace_body,
)
from tests.test_compute_contract import STORAGE, FakeV1Workspace, aml_settings
from tests.test_replay import scripted_activities, start_input

NAME = "video-features"
FOLDER = "https://acct.blob.core.windows.net/outputs/run-7/merged/"


def merged(run_id: str = "run-7") -> MergeSummary:
    return MergeSummary(
        run_id=run_id,
        prefix=f"{run_id}/merged/",
        manifest_blob=f"{run_id}/merged/_manifest.json",
        parts=[f"{run_id}/merged/part-00000.parquet"],
        rows=120,
        items=10,
        dim=576,
    )


def state(run_id: str = "run-7", **options: Any) -> RunState:
    request = RunRequest(
        run_id=run_id,
        manifest="manifests/clips.csv",
        options=RunOptions(register_output=NAME, model="ResNet50", **options),
        manifest_label="/data/clips.csv",
    )
    return RunState(run_id=run_id, request=request)


# == the option, the request =======================================================================


def test_the_option_is_declared_once_and_reaches_the_flags_and_the_merge() -> None:
    flags = {option.field: option for option in option_flags(fleet=True)}
    assert "register_output" in flags
    assert RunOptions(register_output="a.b-c_1").merges_outputs  # registering merges first
    assert not RunOptions().merges_outputs and RunOptions(merge_outputs=True).merges_outputs
    for bad in ("", "-starts-with-dash", "has space", "slash/name", "x" * 256):
        with pytest.raises(ValidationError, match="register_output"):
            RunOptions(register_output=bad)


def test_the_request_names_the_run_the_model_and_the_manifest() -> None:
    request = asset_request(NAME, state(), merged(), FOLDER)
    assert request.name == NAME and request.path == FOLDER
    for fact in ("run-7", "ResNet50", "/data/clips.csv", "10 items", "120 rows", "dim 576"):
        assert fact in request.description
    assert request.tags[TAG_MODEL] == "ResNet50"
    assert request.tags[TAG_MANIFEST] == "/data/clips.csv"
    assert request.tags["batchctl-run-id"] == "run-7"
    long = state().model_copy(
        update={"request": state().request.model_copy(update={"manifest_label": "m" * 3000})}
    )
    assert len(asset_request(NAME, long, merged(), FOLDER).description) == 1000


def test_the_record_says_what_a_downstream_job_takes() -> None:
    record = DataAssetRegistration(
        run_id="run-7",
        name=NAME,
        version="4",
        path=FOLDER,
        description="d",
        registered=True,
        backend="aml",
        record_blob=record_blob_name("run-7"),
    )
    assert record.reference == "azureml:video-features:4"
    assert record.note == "registered the merged output as data asset azureml:video-features:4"
    local = record.model_copy(update={"version": None, "registered": False, "backend": "local"})
    assert local.reference is None
    assert "not registered" in local.note and "run-7/merged_data_asset.json" in local.note


# == SDK v2: the request on the wire is the SDK's own serialisation ================================


class DataService:
    """ARM's data asset routes: the container's GET (its next version, or 404 for a new
    asset) and the version's PUT, recorded with their bodies."""

    def __init__(self, next_version: str | None) -> None:
        self.next_version = next_version
        self.puts: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: requests.PreparedRequest) -> Reply:
        url = str(request.url).split("?", 1)[0]
        container = f"{ARM}{WORKSPACE_ID}/data/{NAME}"
        if is_workspace_get(request):
            return 200, workspace_body(), {}
        if request.method == "GET" and url == container:
            if self.next_version is None:
                return not_found(request)
            body = {
                "id": f"{WORKSPACE_ID}/data/{NAME}",
                "name": NAME,
                "properties": {
                    "dataType": "uri_folder",
                    "latestVersion": str(int(self.next_version) - 1),
                    "nextVersion": self.next_version,
                },
            }
            return 200, body, {}
        if request.method == "PUT" and url.startswith(f"{container}/versions/"):
            sent = json.loads(request.body or b"{}")  # type: ignore[arg-type]
            version = url.rsplit("/", 1)[1]
            self.puts.append((version, sent))
            answer = {
                "id": f"{WORKSPACE_ID}/data/{NAME}/versions/{version}",
                "name": version,
                **sent,
            }
            return 201, answer, {}
        return not_found(request)


@pytest.mark.parametrize(("next_version", "expected"), [(None, "1"), ("4", "4")])
def test_v2_registers_a_new_version_with_the_sdk_s_own_request(
    next_version: str | None, expected: str
) -> None:
    service = DataService(next_version)
    backend = v2_backend(ml_client(RecordingAdapter(service)), STORAGE, aml_settings())
    assert isinstance(backend, DataAssetRegistrar)
    request = asset_request(NAME, state(), merged(), FOLDER)

    assert backend.register_data_asset(request) == expected

    ((version, body),) = service.puts
    assert version == expected
    # What azure-ai-ml itself makes of the entity, serialised as its REST client does
    # (DataVersionsOperations.create_or_update: json.dumps with the SDK's encoder).
    from azure.ai.ml._restclient.arm_ml_service._utils.model_base import SdkJSONEncoder

    rest = build_data_asset(request)._to_rest_object()
    assert body == json.loads(json.dumps(rest, cls=SdkJSONEncoder, exclude_readonly=True))
    properties = body["properties"]
    assert properties["dataType"] == "uri_folder"
    assert properties["dataUri"] == FOLDER
    assert properties["description"] == request.description
    assert properties["tags"] == request.tags


def test_v2_refused_registration_raises_the_sdk_s_error() -> None:
    from azure.core.exceptions import HttpResponseError

    def refused(request: requests.PreparedRequest) -> Reply:
        if is_workspace_get(request):
            return 200, workspace_body(), {}
        if request.method == "PUT":
            return 403, {"error": {"code": "AuthorizationFailed", "message": "no data/write"}}, {}
        return not_found(request)

    backend = v2_backend(ml_client(RecordingAdapter(refused)), STORAGE, aml_settings())
    with pytest.raises(HttpResponseError, match="AuthorizationFailed"):
        backend.register_data_asset(asset_request(NAME, state(), merged(), FOLDER))


def test_v1_cannot_register_and_says_why() -> None:
    backend = v1_backend(FakeV1Workspace(), STORAGE, aml_settings())
    request = DataAssetRequest(name=NAME, path=FOLDER, description="d")
    with pytest.raises(DataAssetsUnsupportedError) as raised:
        backend.register_data_asset(request)
    assert str(raised.value) == V1_DATA_ASSETS_UNSUPPORTED
    assert "azureml-dataprep" in str(raised.value) and "aml" in str(raised.value)


# == the record, in real storage ===================================================================


@pytest.fixture
def outputs(services: Services) -> Iterator[Services]:
    services.store.ensure_containers()
    yield services


def test_a_local_run_writes_what_would_be_registered(outputs: Services, run_id: str) -> None:
    record = register_merged_output(outputs, state(run_id), merged(run_id))
    assert not record.registered and record.version is None and record.backend == "local"
    assert record.path.endswith(f"/outputs/{run_id}/merged/")
    assert record.path.startswith(outputs.settings.blob_url)
    stored = read_registration(outputs.store, outputs.settings.outputs_container, run_id)
    assert stored == record
    # A retried activity writes nothing new and answers the same.
    assert register_merged_output(outputs, state(run_id), merged(run_id)) == record


def test_a_registering_backend_is_asked_once_per_run(outputs: Services, run_id: str) -> None:
    service = DataService("2")
    registrar = v2_backend(ml_client(RecordingAdapter(service)), STORAGE, aml_settings())
    aml = Services(
        settings=outputs.settings, store=outputs.store, ledger=outputs.ledger, backend=registrar
    )
    first = register_merged_output(aml, state(run_id), merged(run_id))
    assert first.registered and first.reference == "azureml:video-features:2"
    assert first.backend == "aml"
    again = register_merged_output(aml, state(run_id), merged(run_id))
    assert again == first and len(service.puts) == 1
    assert read_registration(aml.store, aml.settings.outputs_container, run_id) == first


def test_bad_input_is_refused_by_name(outputs: Services, run_id: str) -> None:
    plain = state(run_id).model_copy(
        update={
            "request": state(run_id).request.model_copy(
                update={"options": RunOptions(merge_outputs=True)}
            )
        }
    )
    with pytest.raises(ValueError, match="asked for no data asset"):
        register_merged_output(outputs, plain, merged(run_id))
    with pytest.raises(ValueError, match="is not run"):
        register_merged_output(outputs, state(run_id), merged("someone-else"))


def test_an_unreadable_record_is_not_trusted(outputs: Services, run_id: str) -> None:
    container = outputs.settings.outputs_container
    outputs.store.upload_bytes(container, record_blob_name(run_id), b"{not json")
    assert read_registration(outputs.store, container, run_id) is None
    record = register_merged_output(outputs, state(run_id), merged(run_id))
    assert read_registration(outputs.store, container, run_id) == record


# == the orchestrator: a bounded step after the merge, replayed at both schema versions ============


class WithRegistration:
    """The shared replay script, plus the registration activity (``fails``: always fails)."""

    def __init__(self, *, fails: bool = False) -> None:
        self.inner = scripted_activities()
        self.fails = fails
        self.payloads: list[Any] = []

    def __call__(self, name: str, payload: Any) -> ActivityOutcome:
        if name != Activity.REGISTER_OUTPUT:
            return self.inner(name, payload)
        self.payloads.append(payload)
        if self.fails:
            return ActivityOutcome(error="register_output failed: AuthorizationFailed")
        run_id = payload["state"]["run_id"]
        record = DataAssetRegistration(
            run_id=run_id,
            name=payload["state"]["request"]["options"]["register_output"],
            version="3",
            path=FOLDER,
            description="d",
            registered=True,
            backend="aml",
            record_blob=record_blob_name(run_id),
        )
        return ActivityOutcome(record.model_dump(mode="json"))


@pytest.mark.parametrize("schema", [SCHEMA_V2, SCHEMA_V3])
def test_registration_replays_after_the_merge_and_before_the_report(schema: int) -> None:
    activities = WithRegistration()
    run = ReplayDriver(run_orchestrator, activities, schema=schema).run(
        start_input(register_output=NAME)
    )
    assert run.output["phase"] == "completed"
    assert run.activity_calls[-4:] == [
        Activity.ANALYSE_SHARDS,  # the last group's part of the report, after teardown
        Activity.MERGE_OUTPUTS,
        Activity.REGISTER_OUTPUT,
        Activity.WRITE_REPORT,
    ]
    assert "data asset azureml:video-features:3" in run.output["message"]
    # What the activity was handed: the run's state and the merge it registers.
    (payload,) = activities.payloads
    assert MergeSummary.model_validate(payload["merged"]).prefix == "run-1/merged/"
    assert RunState.model_validate(payload["state"]).run_id == "run-1"
    # The status a user reads at the end names it too.
    assert "azureml:video-features:3" in run.statuses[-1]["message"]


@pytest.mark.parametrize("schema", [SCHEMA_V2, SCHEMA_V3])
def test_a_failed_registration_is_noted_and_the_run_still_completes(schema: int) -> None:
    from datetime import timedelta

    run = ReplayDriver(
        run_orchestrator,
        WithRegistration(fails=True),
        schema=schema,
        timer_step=timedelta(seconds=5),
    ).run(start_input(register_output=NAME))
    assert run.output["phase"] == "completed"
    assert "registering the merged output as a data asset failed" in run.output["message"]
    assert run.activity_calls.count(Activity.REGISTER_OUTPUT) == RETRY_MAX_ATTEMPTS
    assert run.activity_calls[-1] == Activity.WRITE_REPORT


def test_no_flag_no_registration() -> None:
    run = ReplayDriver(run_orchestrator, WithRegistration()).run(start_input(merge_outputs=True))
    assert Activity.REGISTER_OUTPUT not in run.activity_calls


# == end to end on this machine ====================================================================


@pytest.fixture
def tracking_url() -> Iterator[tuple[str, list[str]]]:
    """An MLflow tracking endpoint that records every request path it gets."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


@pytest.mark.azurite
@pytest.mark.slow
def test_a_local_run_with_register_output_writes_the_would_be_asset(
    tmp_path: Path,
    azurite: Any,
    monkeypatch: pytest.MonkeyPatch,
    tracking_url: tuple[str, list[str]],
) -> None:
    from batchctl.local.samples import encode_sample
    from batchctl.local.session import run_locally
    from tests.test_end_to_end import _tiny_model

    for name, value in azurite.environment().items():
        monkeypatch.setenv(name, value)
    # A shell that points MLflow somewhere, as a data scientist's may: without a run id the
    # local workers log nothing there, and nothing fails.
    url, seen = tracking_url
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    videos = tmp_path / "videos"
    for name, source in (("a.mp4", "testsrc2"), ("b.mp4", "smptebars")):
        encode_sample(videos / name, source, 2, "160x120")
    manifest = tmp_path / "clips.csv"
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video"])
        writer.writerows([["videos/a.mp4"], ["videos/b.mp4"]])
    options = RunOptions(
        model=str(_tiny_model(tmp_path / "tiny.keras")),
        frame_size=64,
        poll_interval_s=1,
        idle_exit_s=2,
        register_output=NAME,
    )
    result = run_locally(manifest, options, run_id="asset-e2e", nodes=1, out_dir=tmp_path / "out")

    report = result.report
    assert report.phase.value == "completed", report.message
    assert report.merged_dataset is not None  # the flag merges first
    asset = report.data_asset
    assert asset is not None and not asset.registered and asset.version is None
    assert asset.name == NAME and asset.path.endswith("/outputs/asset-e2e/merged/")
    assert str(manifest) in asset.description and "tiny.keras" in asset.description
    assert "not registered" in report.message and record_blob_name("asset-e2e") in report.message
    # Copied out with the run, beside the merged folder.
    written = result.output_dir / "merged_data_asset.json"
    assert DataAssetRegistration.model_validate_json(written.read_text()) == asset
    assert (result.output_dir / "merged").is_dir()
    html = result.report_path.with_name("report.html").read_text()
    assert "Data asset" in html and NAME in html
    assert seen == []
