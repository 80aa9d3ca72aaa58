"""`batchctl doctor`: the local checks run for real (ffmpeg, Azurite from node_modules, a real
1-item run); the deployment checks run over a fake DeploymentReader, the one boundary behind
which Azure sits, so each check's ok, FAIL and skip is driven from its answers."""

from __future__ import annotations

import dataclasses
import http.server
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs, urlsplit

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
    "AZURE_RUN_QUEUE_ACCOUNT_NAME": "stqabc",
    "AML_QUOTA_READER_ROLE_ID": "custom-1",
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
_REGISTRIES = "providers/Microsoft.ContainerRegistry/registries"
OWN_REGISTRY_ID = f"{RG_SCOPE}/{_REGISTRIES}/crabc"
SHARED_REGISTRY_ID = f"/subscriptions/{SUB}/resourceGroups/rg-shared/{_REGISTRIES}/crshared"
ACR_PUSH = "8311e382-0749-4cb8-b61a-304f252e45ec"
READER = "acdd72a7-3385-48ef-bd42-f606fba81ae7"
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
        # An Owner's permission entry (Microsoft.Authorization/permissions).
        self.permissions: list[dict[str, Any]] | Exception = [{"actions": ["*"], "notActions": []}]
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
        # Images outside ACR, as an anonymous client finds them.
        self.public_images: set[str] | Exception = set()
        self.registry_list: list[dep.ContainerRegistry] | Exception = [
            dep.ContainerRegistry(OWN_REGISTRY_ID, "crabc", "crabc.azurecr.io"),
            dep.ContainerRegistry(SHARED_REGISTRY_ID, "crshared", "crshared.azurecr.io"),
        ]
        # Every assignment a principal holds anywhere; role_assignments_at answers as ARM does.
        self.tenant_roles: dict[str, list[dep.RoleAssignment]] | Exception = {}
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
        self.calls.append(f"image {image}")
        return image in self._answer(self.images)

    def public_image_exists(self, image: str) -> bool:
        self.calls.append(f"public image {image}")
        return image in self._answer(self.public_images)

    def registries(self) -> Sequence[dep.ContainerRegistry]:
        return self._answer(self.registry_list)

    def role_assignments_at(self, scope: str, principal_id: str) -> Sequence[dep.RoleAssignment]:
        # ARM's principalId filter at a scope: the assignments at, above and below it.
        self.calls.append(f"roles at {scope}")
        target = scope.lower()
        return [
            a
            for a in self._answer(self.tenant_roles).get(principal_id, [])
            if target.startswith(a.scope.lower()) or a.scope.lower().startswith(target)
        ]

    def event_subscriptions(self) -> Sequence[dep.EventSubscription]:
        return self._answer(self.subscriptions)

    def my_permissions(self) -> Sequence[Mapping[str, Any]]:
        return self._answer(self.permissions)

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

    d = deployment()
    # The Bicep names accounts by parameter; the doctor by the azd value of the same account.
    accounts = {"storageAccountName": d.storage_account, "runQueueAccountName": d.run_queue_account}

    def from_bicep(principal: str) -> set[tuple[str, str]]:
        rows = set()
        for who, role, scope in EXPECTED_ASSIGNMENTS:
            if who != principal:
                continue
            kind, _, name_param = scope.partition(":")
            short = kinds.get(kind, kind.rsplit("/", 1)[-1])
            name = name_param.removesuffix("ContainerName").removesuffix("TableName")
            if short == "storageAccounts":
                name = str(accounts[name_param])
            rows.add((role, f"{short}:{name}" if short in kinds.values() else short))
        return rows

    def from_doctor(grants: list[dep.Grant]) -> set[tuple[str, str]]:
        rows = set()
        for grant in grants:
            short = grant.scope_kind.rsplit("/", 1)[-1]
            rows.add(
                (grant.role_name, f"{short}:{grant.scope_name}" if short in kinds.values()
                 else short)
            )  # fmt: skip
        return rows

    assert from_doctor(dep.controller_grants(d)) == from_bicep("controllerPrincipalId")
    assert from_doctor(dep.compute_grants(d)) == from_bicep("computePrincipalId")


def test_quota_actions_are_the_custom_roles() -> None:
    definition = json.loads(
        (Path(__file__).resolve().parents[1] / "infra/roles/aml-quota-reader.json").read_text()
    )
    assert tuple(definition["Actions"]) == dep.QUOTA_ACTIONS


def test_roles_without_the_optional_quota_role_say_so_and_pass(reader: FakeReader) -> None:
    # A deployer without roleDefinitions/write deploys without the quota role (docs/deploy.md).
    assert isinstance(reader.roles, dict)
    reader.roles["ctrl-principal"] = [
        a for a in reader.roles["ctrl-principal"] if a.role_definition_id != QUOTA_ROLE
    ]
    controller, _ = dep.check_roles(reader, deployment(AML_QUOTA_READER_ROLE_ID=""))
    assert controller.status is Status.OK
    assert "no quota reads" in controller.what and "create-quota-role.sh" in controller.what


def test_deployer_check_names_what_the_account_lacks(reader: FakeReader, d: dep.Deployment) -> None:
    contributor = {"actions": ["*"], "notActions": ["Microsoft.Authorization/*/Write"]}
    reader.permissions = [contributor]
    result = dep.check_deployer(reader, d)
    assert result.status is Status.FAIL
    assert "Microsoft.Authorization/roleAssignments/write" in result.detail
    reader.permissions = [
        contributor,
        {"actions": ["Microsoft.Authorization/roleAssignments/write"]},
    ]
    assert dep.check_deployer(reader, d).status is Status.OK
    reader.permissions = dep.RefusedError(403, "AuthorizationFailed")
    assert dep.check_deployer(reader, d).status is Status.FAIL
    assert dep.check_deployer(reader, deployment(AZURE_SUBSCRIPTION_ID="")).status is Status.SKIP


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


def test_roles_the_nodes_no_longer_need_are_named_for_removal(
    reader: FakeReader, d: dep.Deployment
) -> None:
    # What an older deployment granted the nodes: Queue Data Contributor on the host's account
    # (Durable's control queues) and Blob Data Contributor on runs.
    assert isinstance(reader.roles, dict)
    old = [
        dep.RoleAssignment(builtin(dep._QUEUE_CONTRIBUTOR), ACCOUNT_SCOPE),
        dep.RoleAssignment(
            builtin(dep._BLOB_CONTRIBUTOR), f"{ACCOUNT_SCOPE}/blobServices/default/containers/runs"
        ),
    ]
    reader.roles["compute-principal"] = [*reader.roles["compute-principal"], *old]
    controller, compute = dep.check_roles(reader, d)
    assert controller.status is Status.OK
    assert compute.status is Status.FAIL and "no longer makes" in compute.detail
    for assignment in old:
        assert f"--scope {assignment.scope}" in compute.detail
    assert f"--role {dep._QUEUE_CONTRIBUTOR}" in compute.detail
    assert "stqabc" not in compute.detail  # the run queues' own grant is expected


def test_roles_need_the_run_queue_account(reader: FakeReader) -> None:
    # A deployment from before the run queues' own account cannot be judged: say what to do.
    results = dep.check_roles(reader, deployment(AZURE_RUN_QUEUE_ACCOUNT_NAME=""))
    assert all(r.status is Status.SKIP for r in results), [r.line() for r in results]
    assert all("AZURE_RUN_QUEUE_ACCOUNT_NAME" in r.detail for r in results)


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


@pytest.mark.parametrize(
    ("image", "registry", "repository", "reference"),
    [
        ("crabc.azurecr.io/mywork:1", "crabc.azurecr.io", "mywork", "1"),
        ("crabc.azurecr.io/team/mywork", "crabc.azurecr.io", "team/mywork", "latest"),
        ("crabc.azurecr.io/mywork@sha256:ab12", "crabc.azurecr.io", "mywork", "sha256:ab12"),
        ("crabc.azurecr.io/mywork:1@sha256:ab12", "crabc.azurecr.io", "mywork", "sha256:ab12"),
        ("mcr.microsoft.com/azureml/base:2", "mcr.microsoft.com", "azureml/base", "2"),
        ("ubuntu:22.04", "docker.io", "library/ubuntu", "22.04"),
        ("team/tool", "docker.io", "team/tool", "latest"),
        ("index.docker.io/team/tool:3", "docker.io", "team/tool", "3"),
        ("localhost:5000/tool:1", "localhost:5000", "tool", "1"),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000", "a/b", "latest"),
    ],
)
def test_image_references_are_read_as_docker_reads_them(
    image: str, registry: str, repository: str, reference: str
) -> None:
    assert dep.ImageRef.parse(image) == dep.ImageRef(registry, repository, reference)


def test_run_image_in_the_deployment_registry(reader: FakeReader, d: dep.Deployment) -> None:
    image = "crabc.azurecr.io/batchctl-node-mywork:1"
    assert isinstance(reader.images, set)
    reader.images.add(image)
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.OK, result.line()
    assert "deployment's registry crabc" in result.what
    assert "compute identity's AcrPull there (checked with its roles)" in result.what
    # Its pull right is check_roles' line: no second lookup of it here.
    assert not any(call.startswith("roles at") for call in reader.calls)
    reader.images.discard(image)
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.FAIL
    assert "not in registry crabc.azurecr.io" in result.detail
    assert "az acr build --registry crabc --image batchctl-node-mywork:1" in result.detail
    digest = "crabc.azurecr.io/batchctl-node-mywork@sha256:ab12"
    result = dep.check_run_image(reader, d, digest)
    assert result.status is Status.FAIL and "no manifest sha256:ab12" in result.detail


def test_run_image_in_another_acr_needs_a_pull_role_there(
    reader: FakeReader, d: dep.Deployment
) -> None:
    image = "crshared.azurecr.io/mywork:2"
    reader.images = {image}
    reader.tenant_roles = {
        "compute-principal": [
            # AcrPull on the deployment's own registry says nothing about the shared one.
            dep.RoleAssignment(builtin(dep._ACR_PULL), OWN_REGISTRY_ID),
        ],
        # Another principal's grant is not the compute identity's.
        "someone-else": [dep.RoleAssignment(builtin(dep._ACR_PULL), SHARED_REGISTRY_ID)],
    }
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.FAIL, result.line()
    assert "compute identity id-compute-abc may not pull from it" in result.detail
    assert (
        "az role assignment create --assignee-object-id compute-principal "
        "--assignee-principal-type ServicePrincipal --role AcrPull "
        f"--scope {SHARED_REGISTRY_ID}"
    ) in result.detail
    assert f"roles at {SHARED_REGISTRY_ID}" in reader.calls

    reader.tenant_roles["compute-principal"].append(
        dep.RoleAssignment(builtin(dep._ACR_PULL), SHARED_REGISTRY_ID)
    )
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.OK, result.line()
    assert "present in crshared.azurecr.io" in result.what
    assert "may pull it (AcrPull on the registry)" in result.what


def test_run_image_pull_through_a_broader_role(reader: FakeReader, d: dep.Deployment) -> None:
    image = "crshared.azurecr.io/mywork:2"
    reader.images = {image}
    reader.actions[builtin(READER)] = ["*/read"]
    reader.actions[builtin(ACR_PUSH)] = [
        dep.PULL_ACTION,
        "Microsoft.ContainerRegistry/registries/push/write",
    ]
    # Reader on the subscription reaches every registry in it.
    reader.tenant_roles = {
        "compute-principal": [dep.RoleAssignment(builtin(READER), f"/subscriptions/{SUB}")]
    }
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.OK and f"at /subscriptions/{SUB}" in result.what
    reader.tenant_roles = {
        "compute-principal": [dep.RoleAssignment(builtin(ACR_PUSH), SHARED_REGISTRY_ID)]
    }
    assert dep.check_run_image(reader, d, image).status is Status.OK
    # A role without the pull action does not count, wherever it is.
    reader.actions[builtin(READER)] = ["Microsoft.ContainerRegistry/registries/read"]
    reader.tenant_roles = {
        "compute-principal": [dep.RoleAssignment(builtin(READER), SHARED_REGISTRY_ID)]
    }
    assert dep.check_run_image(reader, d, image).status is Status.FAIL


def test_run_image_in_an_acr_the_subscription_does_not_hold(
    reader: FakeReader, d: dep.Deployment
) -> None:
    image = "crelsewhere.azurecr.io/mywork:2"
    reader.images = {image}
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.SKIP, result.line()
    assert f"not in subscription {SUB}" in result.detail
    assert (
        "az role assignment list --assignee compute-principal --include-inherited --scope "
        "$(az acr show --name crelsewhere --query id --output tsv)"
    ) in result.detail
    reader.registry_list = dep.RefusedError(403)
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.FAIL and "lists its container registries" in result.detail
    no_principal = deployment(AZURE_COMPUTE_PRINCIPAL_ID="")
    result = dep.check_run_image(reader, no_principal, image)
    assert result.status is Status.SKIP and "AZURE_COMPUTE_PRINCIPAL_ID" in result.detail


def test_public_image_is_read_anonymously(reader: FakeReader, d: dep.Deployment) -> None:
    image = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:latest"
    reader.public_images = {image}
    result = dep.check_run_image(reader, d, image)
    assert result.status is Status.OK, result.line()
    assert "public at mcr.microsoft.com, present" in result.what
    assert "no identity needed" in result.what
    assert reader.calls == [f"public image {image}"]  # no ACR token, no role read
    missing = "docker.io/team/tool:9"
    result = dep.check_run_image(reader, d, missing)
    assert result.status is Status.FAIL and "not found at docker.io" in result.detail
    reader.public_images = dep.UnavailableError("docker.io answered 429 for the manifest")
    result = dep.check_run_image(reader, d, missing)
    assert result.status is Status.SKIP
    assert "429" in result.detail and f"docker manifest inspect {missing}" in result.detail


def test_a_refused_registry_token(reader: FakeReader, d: dep.Deployment) -> None:
    # Your own identity's token for an ACR: the line names the role you lack.
    reader.images = dep.RefusedError(401, "the registry refused the token exchange")
    result = dep.check_run_image(reader, d, "crshared.azurecr.io/mywork:2")
    assert result.status is Status.FAIL
    assert "refused (401)" in result.detail
    assert "AcrPull (or Reader) on registry crshared.azurecr.io" in result.detail
    # No anonymous token: the nodes, which pull without credentials, could not pull either.
    reader.public_images = dep.RefusedError(401, "no anonymous pull token")
    result = dep.check_run_image(reader, d, "ghcr.io/team/private:1")
    assert result.status is Status.FAIL
    assert "ghcr.io refused an anonymous pull (401" in result.detail
    assert "az acr import --name crabc --source ghcr.io/team/private:1" in result.detail


def test_run_image_unreadable_is_a_skip_with_the_command(
    reader: FakeReader, d: dep.Deployment
) -> None:
    reader.images = dep.UnavailableError("cannot sign in: run `az login`")
    result = dep.check_run_image(reader, d, "crabc.azurecr.io/mywork@sha256:ab12")
    assert result.status is Status.SKIP
    assert "az acr repository show --name crabc --image mywork@sha256:ab12" in result.detail


def test_run_image_line_follows_the_node_image(reader: FakeReader, d: dep.Deployment) -> None:
    image = "crabc.azurecr.io/batchctl-node:app-tag"
    results = [
        result
        for check in dep.deployment_checks(
            reader, d, vm_size="Standard_NC4as_T4_v3", low_priority=True, has_key=True,
            probe=False, image=image,
        )
        for result in check()
    ]  # fmt: skip
    whats = [r.what for r in results]
    node = next(i for i, what in enumerate(whats) if what.startswith("node image"))
    assert whats[node + 1].startswith(f"run image {image}")
    assert len(results) == 10


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
    # A deployment from before the Event Grid trigger: events still go to the blob webhook.
    reader.subscriptions = [
        dep.EventSubscription(
            "m", "Succeeded", "WebHook", "/blobServices/default/containers/manifests/",
            (dep.BLOB_CREATED,), "https://func-x.azurewebsites.net/runtime/webhooks/blobs",
        )
    ]  # fmt: skip
    stale = dep.check_event_subscription(reader, d)
    assert stale.status is Status.FAIL and "azd hooks run postdeploy" in stale.detail
    assert "blob extension" in stale.detail
    reader.subscriptions[0] = dataclasses.replace(
        reader.subscriptions[0],
        endpoint_base_url="https://func-x.azurewebsites.net/runtime/webhooks/eventgrid",
    )
    assert dep.check_event_subscription(reader, d).status is Status.OK


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


def test_command_image_flag_reaches_the_check(
    azd_project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    fakes: list[FakeReader] = []

    def make(found: dep.Deployment, key: str | None) -> FakeReader:
        fake = FakeReader(found)
        fake.public_images = {"ghcr.io/team/tool:1"}
        fakes.append(fake)
        return fake

    monkeypatch.setattr(doctor_cmd, "make_reader", make)
    url = "https://func-abc.azurewebsites.net"
    code = cli.main(["doctor", "--app", url, "--image", "ghcr.io/team/tool:1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    checks = json.loads(out)["checks"]
    image_checks = [c for c in checks if c["what"].startswith("run image ghcr.io/team/tool:1")]
    assert [c["status"] for c in image_checks] == ["ok"]
    assert "public image ghcr.io/team/tool:1" in fakes[0].calls
    assert len(checks) == 10  # the usual nine lines and this one

    code = cli.main(["doctor", "--app", url, "--image", "ghcr.io/team/gone:1", "--json"])
    out, _ = capsys.readouterr()
    assert code == 1
    failed = [c for c in json.loads(out)["checks"] if c["status"] == "FAIL"]
    assert [c["what"] for c in failed] == ["run image ghcr.io/team/gone:1"]


def test_command_image_needs_a_deployment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # no azd project and no app URL: a local doctor
    monkeypatch.delenv("BATCHCTL_APP_URL", raising=False)
    code = cli.main(["doctor", "--image", "ghcr.io/team/tool:1", "--json"])
    out, err = capsys.readouterr()
    assert code == 3
    assert json.loads(out)["flag"] == "--image" and "--app" in err


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
        (["doctor", "--image", "Upper/Case:1"], "--image"),
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


# -- the real reader's image reads, over a real registry protocol on loopback -----------------
class Registry:
    """What a registry on this machine answers: the OCI distribution token flow (a Bearer
    challenge, a token realm, manifests), a Basic challenge, or no auth at all (mcr's way);
    ACR's token exchange refuses."""

    def __init__(self) -> None:
        self.auth = "bearer"  # or "basic", "open"
        self.refuse_token = False
        self.manifests = {"team/tool": {"1", "sha256:ab12"}}
        self.token_queries: list[str] = []
        self.host = ""

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _reply(self, status: int, body: bytes = b"", **headers: str) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/v2/":
                    if registry.auth == "open":
                        return self._reply(200, b"{}")
                    challenge = (
                        f'Bearer realm="http://{registry.host}/token",service="test-registry"'
                        if registry.auth == "bearer"
                        else 'Basic realm="test"'
                    )
                    return self._reply(401, b"{}", WWW_Authenticate=challenge)
                if self.path.startswith("/token?"):
                    registry.token_queries.append(self.path)
                    if registry.refuse_token:
                        return self._reply(401, b'{"details": "no anonymous access"}')
                    return self._reply(200, b'{"token": "anonymous-pull-token"}')
                return self._reply(404)

            def do_HEAD(self) -> None:
                # /v2/<name>/manifests/<reference>
                name, _, reference = self.path.removeprefix("/v2/").rpartition("/manifests/")
                token = self.headers.get("Authorization")
                if registry.auth == "bearer" and token != "Bearer anonymous-pull-token":
                    return self._reply(401)
                known = reference in registry.manifests.get(name, set())
                return self._reply(200 if known else 404)

            def do_POST(self) -> None:
                # ACR's /oauth2/exchange, for an identity the registry does not let in.
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                return self._reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}')

            def log_message(self, *args: object) -> None:
                pass

        return Handler


@pytest.fixture
def registry() -> Iterator[Registry]:
    state = Registry()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), state.handler())
    state.host = f"127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


class StaticCredential:
    """An ARM token credential for the exchange test (the registry refuses it anyway)."""

    def get_token(self, *scopes: str, **kwargs: object) -> object:
        return type("Token", (), {"token": "arm-token", "expires_on": 2**31})()


def test_real_reader_anonymous_flow_present_and_absent(registry: Registry) -> None:
    reader = AzureDeploymentReader(deployment(), key=None)
    assert reader.public_image_exists(f"{registry.host}/team/tool:1") is True
    assert reader.public_image_exists(f"{registry.host}/team/tool@sha256:ab12") is True
    assert reader.public_image_exists(f"{registry.host}/team/tool:2") is False
    # The token was asked for one repository's pull, for the service the challenge named.
    query = parse_qs(urlsplit(registry.token_queries[0]).query)
    assert query == {"scope": ["repository:team/tool:pull"], "service": ["test-registry"]}
    registry.auth = "open"  # mcr.microsoft.com serves manifests without any token
    assert reader.public_image_exists(f"{registry.host}/team/tool:1") is True


def test_real_reader_anonymous_flow_refused(registry: Registry) -> None:
    reader = AzureDeploymentReader(deployment(), key=None)
    registry.refuse_token = True
    with pytest.raises(dep.RefusedError) as refused:
        reader.public_image_exists(f"{registry.host}/team/tool:1")
    assert refused.value.status == 401
    registry.auth = "basic"  # credentials only: the nodes have none to give
    with pytest.raises(dep.RefusedError):
        reader.public_image_exists(f"{registry.host}/team/tool:1")
    gone = "127.0.0.1:9/team/tool:1"  # nothing listens on port 9 (discard)
    with pytest.raises(dep.UnavailableError, match=r"cannot reach 127\.0\.0\.1:9"):
        reader.public_image_exists(gone)


def test_real_reader_acr_token_exchange_refused(registry: Registry) -> None:
    reader = AzureDeploymentReader(deployment(), key=None, credential=StaticCredential())
    with pytest.raises(dep.RefusedError, match="refused the token exchange"):
        reader.image_exists(f"{registry.host}/team/tool:1")


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


def test_command_deployer_checks_only_your_roles(
    azd_project: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # Before `azd up`: the subscription comes from the environment; nothing else is read.
    seen: list[dep.Deployment] = []

    def make(found: dep.Deployment, key: str | None) -> FakeReader:
        seen.append(found)
        fake = FakeReader(found)
        fake.permissions = [{"actions": ["*"], "notActions": ["Microsoft.Authorization/*/Write"]}]
        return fake

    monkeypatch.setattr(doctor_cmd, "make_reader", make)
    code = cli.main(["doctor", "--deployer", "--json"])
    out, err = capsys.readouterr()
    assert code == 1, err
    (check,) = json.loads(out)["checks"]
    assert check["status"] == "FAIL" and "roleAssignments/write" in check["detail"]
    assert seen[0].subscription_id == SUB and seen[0].app_url is None
