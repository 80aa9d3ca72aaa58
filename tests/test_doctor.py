"""`batchctl doctor`: the local checks run for real (ffmpeg, Azurite from node_modules, a real
1-item run); the deployment checks run over a fake DeploymentReader, the one boundary behind
which Azure sits, so each check's ok, FAIL and skip is driven from its answers."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest

from batchctl import cli
from batchctl.commands import doctor as doctor_cmd
from batchctl.compute.aml.quota import quota_from_listings
from batchctl.compute.base import ComputeError, Quota
from batchctl.doctor import deployment as dep
from batchctl.doctor import local
from batchctl.doctor.azure_reader import AzureDeploymentReader
from batchctl.doctor.report import Status
from tests.test_infra import EXPECTED_ASSIGNMENTS

SUB = "00000000-0000-0000-0000-000000000001"
RG = "rg-dev"
KEY = "doctor-test-key-not-for-printing"
T = TypeVar("T")

AZD_VALUES = {
    "AZURE_SUBSCRIPTION_ID": SUB,
    "AZURE_RESOURCE_GROUP": RG,
    "AZURE_LOCATION": "eastus",
    "AZURE_FUNCTION_APP_NAME": "func-abc",
    "AZURE_FUNCTION_APP_URL": "https://func-abc.azurewebsites.net",
    "BATCHCTL_APP_URL": "https://func-abc.azurewebsites.net",
    "AZURE_STORAGE_ACCOUNT_NAME": "stabc",
    "AZURE_ML_WORKSPACE_NAME": "mlw-abc",
    "AZURE_CONTAINER_REGISTRY_NAME": "crabc",
    "AZURE_NODE_IMAGE": "crabc.azurecr.io/batchctl-node:azd-tag",
    "AZURE_EVENTGRID_SYSTEM_TOPIC_NAME": "evgt-abc",
    "AZURE_MANIFESTS_CONTAINER": "manifests",
    "AZURE_CONTROLLER_PRINCIPAL_ID": "ctrl-principal",
    "AZURE_COMPUTE_PRINCIPAL_ID": "compute-principal",
    "AZURE_COMPUTE_IDENTITY_NAME": "id-compute-abc",
    "AZURE_APPLICATION_INSIGHTS_NAME": "appi-abc",
}


def deployment(**overrides: str) -> dep.Deployment:
    values = {**AZD_VALUES, **overrides}
    values = {k: v for k, v in values.items() if v}
    return dep.Deployment.from_values(
        values, app_url=values.get("BATCHCTL_APP_URL"), source="test values"
    )


# -- the fake at the adapter boundary ----------------------------------------------------------
RG_SCOPE = f"/subscriptions/{SUB}/resourceGroups/{RG}"
ACCOUNT_SCOPE = f"{RG_SCOPE}/providers/Microsoft.Storage/storageAccounts/stabc"
QUOTA_ROLE = f"/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/custom-1"


def builtin(guid: str) -> str:
    return f"/subscriptions/{SUB}/providers/Microsoft.Authorization/roleDefinitions/{guid}"


def assignments_for(grants: list[dep.Grant]) -> list[dep.RoleAssignment]:
    """What ARM lists for a principal that holds exactly ``grants``."""
    found = []
    for grant in grants:
        kind = grant.scope_kind
        if kind.startswith("providers/"):
            scope = f"{RG_SCOPE}/{kind}/{grant.scope_name}"
        else:  # under the storage account
            scope = f"{ACCOUNT_SCOPE}/{kind}/{grant.scope_name}"
        found.append(dep.RoleAssignment(builtin(grant.role_id), scope))
    return found


# The region's listings in the shapes the REST API documents (camelCase), parsed by the
# backend's own parser: 24 low-priority cores free of 100 for a 4-core size.
SIZES = [
    {
        "name": "Standard_NC4as_T4_v3",
        "family": "standardNCASv3_T4Family",
        "vCPUs": 4,
        "gpus": 1,
        "lowPriorityCapable": True,
    }
]
USAGES = [
    {
        "type": "Microsoft.MachineLearningServices/lowPriorityCores/usages",
        "name": {"value": "Total Cluster LowPriority Regional vCPUs"},
        "limit": 100,
        "currentValue": 76,
    }
]


class FakeReader:
    """Answers as a healthy deployment would; tests change one answer at a time."""

    def __init__(self, d: dep.Deployment) -> None:
        self.providers = dict.fromkeys(dep.PROVIDERS, "Registered")
        self.quota: Quota | Exception = quota_from_listings(
            "Standard_NC4as_T4_v3", low_priority=True, sizes=SIZES, usages=USAGES
        )
        self.ws: dep.Workspace | Exception | None = dep.Workspace(
            "mlw-abc", "eastus", "ws-principal", "Succeeded"
        )
        self.roles: dict[str, list[dep.RoleAssignment]] | Exception = {
            "ctrl-principal": [
                *assignments_for(dep.controller_grants(d)),
                dep.RoleAssignment(QUOTA_ROLE, f"/subscriptions/{SUB}"),
            ],
            "compute-principal": assignments_for(dep.compute_grants(d)),
        }
        self.actions = {QUOTA_ROLE: list(dep.QUOTA_ACTIONS)}
        self.settings: dict[str, str] | Exception = {
            dep.NODE_IMAGE_SETTING: "crabc.azurecr.io/batchctl-node:app-tag"
        }
        self.images: set[str] | Exception = {
            "crabc.azurecr.io/batchctl-node:app-tag",
            "crabc.azurecr.io/batchctl-node:azd-tag",
        }
        self.subscriptions: list[dep.EventSubscription] | Exception = [
            dep.EventSubscription(
                "manifests-to-start-run-from-blob",
                "Succeeded",
                "WebHook",
                "/blobServices/default/containers/manifests/",
                (dep.BLOB_CREATED,),
            )
        ]
        self.runs = dep.AppAnswer(200)
        self.probe_outcome: dep.ProbeOutcome | Exception = dep.ProbeOutcome(True, "run r-1 ok")
        self.calls: list[str] = []

    @staticmethod
    def _answer(value: T | Exception) -> T:
        if isinstance(value, Exception):
            raise value
        return value

    def provider_state(self, namespace: str) -> str:
        self.calls.append(f"provider {namespace}")
        return self.providers[namespace]

    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota:
        self.calls.append(f"quota {vm_size} {low_priority}")
        return self._answer(self.quota)

    def workspace(self) -> dep.Workspace | None:
        return self._answer(self.ws)

    def role_assignments(self, principal_id: str) -> Sequence[dep.RoleAssignment]:
        return self._answer(self.roles)[principal_id]

    def role_actions(self, role_definition_id: str) -> Sequence[str]:
        return self.actions.get(role_definition_id, [])

    def app_setting(self, name: str) -> str | None:
        return self._answer(self.settings).get(name)

    def image_exists(self, image: str) -> bool:
        return image in self._answer(self.images)

    def event_subscriptions(self) -> Sequence[dep.EventSubscription]:
        return self._answer(self.subscriptions)

    def get_runs(self) -> dep.AppAnswer:
        return self.runs

    def probe(self, vm_size: str) -> dep.ProbeOutcome:
        self.calls.append(f"probe {vm_size}")
        return self._answer(self.probe_outcome)


@pytest.fixture
def d() -> dep.Deployment:
    return deployment()


@pytest.fixture
def reader(d: dep.Deployment) -> FakeReader:
    return FakeReader(d)


# -- the reader's contract and the Bicep ------------------------------------------------------
def test_the_fake_has_every_method_of_the_reader_protocol() -> None:
    wanted = {name for name in vars(dep.DeploymentReader) if not name.startswith("_")}
    assert wanted <= set(vars(FakeReader))
    assert wanted <= set(vars(AzureDeploymentReader))


def test_expected_grants_are_the_bicep_matrix() -> None:
    # What doctor looks for is what infra/modules/rbac.bicep grants (held by test_infra).
    kinds = {
        "Microsoft.Storage/storageAccounts": "storageAccounts",
        "Microsoft.Storage/storageAccounts/blobServices/containers": "containers",
        "Microsoft.Storage/storageAccounts/tableServices/tables": "tables",
    }

    def from_bicep(principal: str) -> set[tuple[str, str]]:
        rows = set()
        for who, role, scope in EXPECTED_ASSIGNMENTS:
            if who != principal:
                continue
            kind, _, name_param = scope.partition(":")
            short = kinds.get(kind, kind.rsplit("/", 1)[-1])
            name = name_param.removesuffix("ContainerName").removesuffix("TableName")
            rows.add((role, f"{short}:{name}" if short in ("containers", "tables") else short))
        return rows

    def from_doctor(grants: list[dep.Grant]) -> set[tuple[str, str]]:
        rows = set()
        for grant in grants:
            short = grant.scope_kind.rsplit("/", 1)[-1]
            rows.add(
                (grant.role_name, f"{short}:{grant.scope_name}" if short in kinds.values()
                 and short != "storageAccounts" else short)
            )  # fmt: skip
        return rows

    d = deployment()
    assert from_doctor(dep.controller_grants(d)) == from_bicep("controllerPrincipalId")
    assert from_doctor(dep.compute_grants(d)) == from_bicep("computePrincipalId")


def test_quota_actions_are_the_custom_roles() -> None:
    text = (
        Path(__file__).resolve().parents[1] / "infra/modules/rbac-subscription.bicep"
    ).read_text()
    for action in dep.QUOTA_ACTIONS:
        assert f"'{action}'" in text


# -- each deployment check --------------------------------------------------------------------
def test_all_ok(reader: FakeReader, d: dep.Deployment) -> None:
    results = [
        result
        for check in dep.deployment_checks(
            reader, d, vm_size="Standard_NC4as_T4_v3", low_priority=True, has_key=True, probe=True
        )
        for result in check()
    ]
    assert [r.status for r in results] == [Status.OK] * 9, [r.line() for r in results]
    lines = "\n".join(r.line() for r in results)
    assert "24 of 100 cores free (6 nodes of 4)" in lines
    assert "batchctl-node:app-tag (the app's BATCHCTL_AML_NODE_IMAGE): present" in lines
    assert "probe Standard_NC4as_T4_v3" in reader.calls


def test_providers(reader: FakeReader, d: dep.Deployment) -> None:
    reader.providers["Microsoft.EventGrid"] = "NotRegistered"
    result = dep.check_providers(reader, d)
    assert result.status is Status.FAIL
    assert "az provider register --namespace Microsoft.EventGrid" in result.detail
    assert "Microsoft.Storage" not in result.detail
    assert dep.check_providers(reader, deployment(AZURE_SUBSCRIPTION_ID="")).status is Status.SKIP


def test_quota_refused_says_which_role(reader: FakeReader, d: dep.Deployment) -> None:
    reader.quota = dep.RefusedError(403, "AuthorizationFailed")
    result = dep.check_quota(reader, d, "Standard_NC4as_T4_v3", low_priority=True)
    assert result.status is Status.FAIL
    assert "Microsoft.MachineLearningServices/locations/usages/read" in result.detail
    assert "quota reader" in result.detail
    assert result.line().startswith("FAIL low-priority quota for Standard_NC4as_T4_v3 in eastus")


def test_quota_exhausted_unknown_and_unoffered(reader: FakeReader, d: dep.Deployment) -> None:
    full = [{**USAGES[0], "currentValue": 99}]
    reader.quota = quota_from_listings(
        "Standard_NC4as_T4_v3", low_priority=True, sizes=SIZES, usages=full
    )
    result = dep.check_quota(reader, d, "Standard_NC4as_T4_v3", low_priority=True)
    assert result.status is Status.FAIL and "request low-priority quota" in result.detail
    reader.quota = quota_from_listings(
        "Standard_NC4as_T4_v3", low_priority=True, sizes=SIZES, usages=[]
    )
    assert dep.check_quota(reader, d, "Standard_NC4as_T4_v3", low_priority=True).status is (
        Status.SKIP
    )
    reader.quota = ComputeError("Standard_X is not offered for AML compute in this region")
    result = dep.check_quota(reader, d, "Standard_X", low_priority=True)
    assert result.status is Status.FAIL and "--vm-size" in result.detail
    reader.quota = dep.UnavailableError("azure-ai-ml is not installed: pip install -e '.[aml]'")
    assert dep.check_quota(reader, d, "Standard_X", low_priority=True).status is Status.SKIP


def test_workspace(reader: FakeReader, d: dep.Deployment) -> None:
    reader.ws = None
    assert "azd provision" in dep.check_workspace(reader, d).detail
    reader.ws = dep.Workspace("mlw-abc", "eastus", None, "Succeeded")
    result = dep.check_workspace(reader, d)
    assert result.status is Status.FAIL and "managed identity" in result.detail
    reader.ws = dep.Workspace("mlw-abc", "eastus", "p", "Failed")
    assert "Failed" in dep.check_workspace(reader, d).detail
    reader.ws = dep.RefusedError(403)
    assert "Reader on resource group rg-dev" in dep.check_workspace(reader, d).detail


def test_roles_missing_grants_are_named(reader: FakeReader, d: dep.Deployment) -> None:
    assert isinstance(reader.roles, dict)
    reader.roles["compute-principal"] = [
        a for a in reader.roles["compute-principal"] if not a.scope.endswith("/containers/media")
    ]
    reader.roles["ctrl-principal"] = [
        a for a in reader.roles["ctrl-principal"] if a.role_definition_id != QUOTA_ROLE
    ]
    controller, compute = dep.check_roles(reader, d)
    assert controller.status is Status.FAIL and "quota reader role" in controller.detail
    assert compute.status is Status.FAIL
    assert "Storage Blob Data Reader on containers media" in compute.detail
    assert "AcrPull" not in compute.detail


def test_roles_wildcard_role_covers_the_quota_reads(reader: FakeReader, d: dep.Deployment) -> None:
    reader.actions[QUOTA_ROLE] = ["*/read"]  # Reader on the subscription
    assert dep.check_roles(reader, d)[0].status is Status.OK
    reader.actions[QUOTA_ROLE] = ["Microsoft.MachineLearningServices/locations/usages/read"]
    assert dep.check_roles(reader, d)[0].status is Status.FAIL


def test_roles_grant_on_another_account_does_not_count(reader: FakeReader) -> None:
    other = deployment(AZURE_STORAGE_ACCOUNT_NAME="stother")
    controller, _ = dep.check_roles(reader, other)
    assert controller.status is Status.FAIL and "Storage Blob Data Owner" in controller.detail


def test_roles_skip_without_principal_or_sdk(reader: FakeReader) -> None:
    skipped = dep.check_roles(reader, deployment(AZURE_COMPUTE_PRINCIPAL_ID=""))
    assert [r.status for r in skipped] == [Status.OK, Status.SKIP]
    assert "AZURE_COMPUTE_PRINCIPAL_ID" in skipped[1].detail
    reader.roles = dep.UnavailableError("cannot sign in: run `az login`")
    result = dep.check_roles(reader, deployment())[0]
    assert result.status is Status.SKIP
    assert "az role assignment list --assignee ctrl-principal" in result.detail


def test_node_image(reader: FakeReader, d: dep.Deployment) -> None:
    reader.images = set()
    result = dep.check_node_image(reader, d)
    assert result.status is Status.FAIL and "azd hooks run postprovision" in result.detail
    reader.settings = dep.RefusedError(403)
    reader.images = {"crabc.azurecr.io/batchctl-node:azd-tag"}
    result = dep.check_node_image(reader, d)
    assert result.status is Status.OK and "AZURE_NODE_IMAGE" in result.what
    reader.images = dep.UnavailableError("registry token exchange answered 500")
    result = dep.check_node_image(reader, d)
    assert result.status is Status.SKIP
    assert "az acr repository show --name crabc --image batchctl-node:azd-tag" in result.detail


def test_event_subscription(reader: FakeReader, d: dep.Deployment) -> None:
    assert isinstance(reader.subscriptions, list)
    reader.subscriptions = [
        dep.EventSubscription(
            "old", "Succeeded", "WebHook", "/blobServices/default/containers/manifests-old/",
            (dep.BLOB_CREATED,),
        )
    ]  # fmt: skip
    result = dep.check_event_subscription(reader, d)
    assert result.status is Status.FAIL and "azd hooks run postdeploy" in result.detail
    reader.subscriptions = [
        dep.EventSubscription(
            "m", "Failed", "WebHook", "/blobServices/default/containers/manifests/",
            (dep.BLOB_CREATED,),
        )
    ]  # fmt: skip
    assert "Failed" in dep.check_event_subscription(reader, d).detail


def test_app_key_command_never_the_key(reader: FakeReader, d: dep.Deployment) -> None:
    reader.runs = dep.AppAnswer(401)
    no_key = dep.check_app(reader, d, has_key=False)
    assert no_key.status is Status.FAIL and "BATCHCTL_FUNCTION_KEY is not set" in no_key.detail
    assert "az functionapp keys list --resource-group rg-dev --name func-abc" in no_key.detail
    wrong = dep.check_app(reader, d, has_key=True)
    assert "refused (401)" in wrong.detail
    reader.runs = dep.AppAnswer(None, "cannot reach the app")
    assert "azd deploy" in dep.check_app(reader, d, has_key=True).detail
    reader.runs = dep.AppAnswer(404)
    assert "not a batchctl app" in dep.check_app(reader, d, has_key=True).detail


def test_probe_only_when_asked(reader: FakeReader, d: dep.Deployment) -> None:
    checks = dep.deployment_checks(
        reader, d, vm_size="Standard_NC4as_T4_v3", low_priority=True, has_key=True, probe=False
    )
    last = checks[-1]()[0]
    assert last.status is Status.SKIP and "--probe" in last.detail
    assert not any(call.startswith("probe") for call in reader.calls)
    reader.probe_outcome = dep.ProbeOutcome(False, "run r-2 failed: 1 item failed")
    assert dep.check_probe(reader, d, "Standard_NC4as_T4_v3").status is Status.FAIL


# -- the command over the fake reader ---------------------------------------------------------
@pytest.fixture
def azd_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "azure.yaml").write_text("name: batchctl\n")
    (tmp_path / ".azure" / "dev").mkdir(parents=True)
    (tmp_path / ".azure" / "config.json").write_text('{"version": 1, "defaultEnvironment": "dev"}')
    (tmp_path / ".azure" / "dev" / ".env").write_text(
        "".join(f'{key}="{value}"\n' for key, value in sorted(AZD_VALUES.items()))
    )
    monkeypatch.chdir(tmp_path)
    for name in ("BATCHCTL_APP_URL", "AZURE_ENV_NAME", *AZD_VALUES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BATCHCTL_FUNCTION_KEY", KEY)
    return tmp_path


def test_command_reads_the_azd_environment_and_prints_one_line_a_check(
    azd_project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    seen: list[dep.Deployment] = []

    def make(found: dep.Deployment, key: str | None) -> FakeReader:
        assert key == KEY
        seen.append(found)
        fake = FakeReader(found)
        fake.runs = dep.AppAnswer(403)
        return fake

    monkeypatch.setattr(doctor_cmd, "make_reader", make)
    code = cli.main(["doctor", "--vm-size", "Standard_NC4as_T4_v3"])
    out, err = capsys.readouterr()
    assert code == 1  # the app refused the key
    lines = out.strip().splitlines()
    assert lines[0].startswith("batchctl doctor: deployment at https://func-abc.azurewebsites.net")
    assert "BATCHCTL_APP_URL in" in lines[0]
    assert len(lines) == 1 + 9
    assert all(line.split(" ", 1)[0] in ("ok", "FAIL", "skip") for line in lines[1:])
    assert sum(line.startswith("FAIL") for line in lines) == 1
    assert KEY not in out + err
    assert seen[0].resource_group == RG and seen[0].subscription_id == SUB


def test_command_json_and_the_flag_wins(
    azd_project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    seen: list[dep.Deployment] = []

    def make(found: dep.Deployment, key: str | None) -> FakeReader:
        seen.append(found)
        return FakeReader(found)

    monkeypatch.setattr(doctor_cmd, "make_reader", make)
    code = cli.main(["doctor", "--app", "https://func-other.azurewebsites.net", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    answer = json.loads(out.strip())  # stdout holds the JSON line only
    assert answer["exit_code"] == 0
    assert [c["status"] for c in answer["checks"]] == ["ok"] * 8 + ["skip"]
    assert seen[0].app_url == "https://func-other.azurewebsites.net"
    assert "from --app" in err


def test_a_check_that_raises_is_a_fail_and_the_rest_still_run(
    azd_project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    def make(found: dep.Deployment, key: str | None) -> FakeReader:
        fake = FakeReader(found)
        fake.ws = RuntimeError("the SDK broke")
        return fake

    monkeypatch.setattr(doctor_cmd, "make_reader", make)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "RuntimeError: the SDK broke" in out
    assert "Event Grid subscription" in out  # a later check still ran


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["doctor", "--vm-size", "not a size"], "--vm-size"),
        (["doctor", "--app", "http://example.com"], "--app"),
        (["doctor", "--app", "https://x.azurewebsites.net?code=abc"], "--app"),
        (["doctor", "--probe", "--no-probe"], "--no-probe"),
        (["doctor", "--dedicated", "--low-priority"], "--low-priority"),
    ],
)
def test_bad_input_is_one_line_and_exit_3(argv: list[str], flag: str, capsys) -> None:
    code = cli.main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 3
    assert len(err.strip().splitlines()) == 1 and flag in err
    assert json.loads(out)["flag"] == flag
    assert "code=abc" not in err  # a key typed into a URL is never echoed


# -- the real reader's app read, over real HTTP ----------------------------------------------
@pytest.fixture
def app_server() -> Iterator[tuple[str, list[dict[str, str]]]]:
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
            good = self.headers.get("x-functions-key") == KEY and self.path == "/api/runs"
            self.send_response(200 if good else 401)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b"[]" if good else b'{"error": "unauthorized"}')

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_real_reader_asks_get_api_runs_with_the_key_header(app_server) -> None:
    url, seen = app_server
    found = deployment(BATCHCTL_APP_URL=url)
    assert AzureDeploymentReader(found, key=KEY).get_runs() == dep.AppAnswer(200)
    assert seen[-1]["path"] == "/api/runs" and seen[-1]["x-functions-key"] == KEY
    assert AzureDeploymentReader(found, key="wrong").get_runs().status == 401
    assert AzureDeploymentReader(found, key=None).get_runs().status == 401
    gone = AzureDeploymentReader(deployment(BATCHCTL_APP_URL="http://127.0.0.1:9"), key=KEY)
    answer = gone.get_runs()
    assert answer.status is None and "127.0.0.1:9" in answer.problem


# -- the local checks, for real ---------------------------------------------------------------
def test_local_checks_pass_on_this_machine(tmp_path: Path) -> None:
    for result in (
        local.check_python_modules(),
        local.check_ffmpeg(tmp_path),
        local.check_azurite(),
        local.check_disk(),
        local.check_default_model({}),
    ):
        assert result.status is Status.OK, result.line()
    assert "protocol whitelist file,pipe" in local.check_ffmpeg(tmp_path).what


def test_missing_modules_say_what_to_install() -> None:
    result = local.check_python_modules(lambda name: None if name == "keras" else object())
    assert result.status is Status.FAIL and "pip install -e '.[worker]'" in result.detail
    result = local.check_python_modules(lambda name: None if name == "pydantic" else object())
    assert "pip install -e ." in result.detail


def test_missing_ffmpeg_or_azurite(tmp_path: Path) -> None:
    result = local.check_ffmpeg(tmp_path, which=lambda name: None)
    assert result.status is Status.FAIL and "apt-get install ffmpeg" in result.detail
    root = Path(__file__).resolve().parents[1]
    (tmp_path / "package-lock.json").write_text((root / "package-lock.json").read_text())
    result = local.check_azurite(tmp_path)
    assert result.status is Status.FAIL and "npm ci" in result.detail
    (tmp_path / "node_modules" / "azurite").mkdir(parents=True)
    (tmp_path / "node_modules" / ".bin").mkdir()
    (tmp_path / "node_modules" / ".bin" / "azurite").write_text("")
    (tmp_path / "node_modules" / "azurite" / "package.json").write_text('{"version": "0.0.1"}')
    result = local.check_azurite(tmp_path)
    assert result.status is Status.FAIL and "0.0.1 installed" in result.detail


def test_disk_below_the_need_fails() -> None:
    assert local.check_disk(need_bytes=10**18).status is Status.FAIL


def test_default_model_weights(tmp_path: Path) -> None:
    (tmp_path / "MobileNetV3Small.weights.h5").write_bytes(b"")
    baked = local.check_default_model({"BATCHCTL_WEIGHTS_DIR": str(tmp_path)})
    assert baked.status is Status.OK and "RANDOM" not in baked.what
    assert "RANDOM weights" in local.check_default_model({}).what


@pytest.mark.slow
def test_local_probe_runs_one_item_for_real(tmp_path: Path) -> None:
    result = local.check_local_probe(tmp_path)
    assert result.status is Status.OK, result.line()
    assert "succeeded" in result.what


def test_local_command_without_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # no azd project here: the local checks
    monkeypatch.delenv("BATCHCTL_APP_URL", raising=False)
    code = cli.main(["doctor", "--no-probe", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    statuses = [c["status"] for c in json.loads(out)["checks"]]
    assert statuses == ["ok"] * 5 + ["skip"]
    assert "this machine" in err
