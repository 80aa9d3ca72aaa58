"""What a deployed app needs before a user spends anything, one check a function.

Every Azure read goes through a :class:`DeploymentReader`: a narrow object with the few
reads these checks make. ``batchctl.doctor.azure_reader`` is the real one (azure-core's
pipeline to ARM, the AML backend's own quota path, the app's HTTP API); tests hand in a fake
one and drive each check's ok, FAIL and skip. A reader raises :class:`RefusedError` for a 401/403
(the check then names the role to ask for), :class:`UnavailableError` when it cannot ask at all
(no SDK, no sign-in), and returns None for what does not exist.

The values that say where the deployment is (subscription, resource group, names, principal
ids) are azd's environment values (``Deployment.from_values``), read from ``.azure/<env>/.env``
or the shell (the same names).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from batchctl.compute.base import ComputeError, Quota
from batchctl.doctor.deployer import DEPLOYER_ACTIONS, missing_actions, verdict
from batchctl.doctor.report import CheckResult, fail, ok, skip

# Registered providers a deployment and its runs need (docs/deploy.md lists the rest that
# `azd up` itself needs; these are the ones a run touches).
PROVIDERS = (
    "Microsoft.MachineLearningServices",
    "Microsoft.Storage",
    "Microsoft.Web",
    "Microsoft.EventGrid",
    "Microsoft.ContainerRegistry",
)
QUOTA_ACTIONS = (
    "Microsoft.MachineLearningServices/locations/usages/read",
    "Microsoft.MachineLearningServices/locations/vmsizes/read",
)
NODE_IMAGE_SETTING = "BATCHCTL_AML_NODE_IMAGE"
BLOB_CREATED = "Microsoft.Storage.BlobCreated"
# The ARM action a role needs for `docker pull` from an ACR (AcrPull holds just this one;
# AcrPush, Reader ('*/read'), Contributor and Owner ('*') cover it too).
PULL_ACTION = "Microsoft.ContainerRegistry/registries/pull/read"
ACR_SUFFIX = ".azurecr.io"
DOCKER_HUB = "docker.io"


class RefusedError(Exception):
    """Azure said 401/403: the signed-in identity lacks a role for this read."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"HTTP {status}")
        self.status = status


class UnavailableError(Exception):
    """The read cannot be made from here (SDK missing, not signed in); says what to run."""


@dataclass(frozen=True)
class Workspace:
    name: str
    location: str
    identity_principal_id: str | None
    provisioning_state: str


@dataclass(frozen=True)
class RoleAssignment:
    role_definition_id: str  # the full ARM id; built-in roles end in their well-known guid
    scope: str


@dataclass(frozen=True)
class EventSubscription:
    name: str
    provisioning_state: str
    endpoint_type: str
    subject_begins_with: str
    included_event_types: tuple[str, ...]
    # ARM shows a webhook's URL without its query (the key): destination.properties.endpointBaseUrl.
    endpoint_base_url: str = ""


@dataclass(frozen=True)
class AppAnswer:
    """What GET /api/runs answered: the HTTP status, or why it could not be asked."""

    status: int | None
    problem: str = ""


@dataclass(frozen=True)
class ProbeOutcome:
    succeeded: bool
    summary: str


@dataclass(frozen=True)
class ContainerRegistry:
    """One ``Microsoft.ContainerRegistry/registries`` resource of the subscription."""

    id: str  # the ARM id: the scope a pull right is assigned at (or above)
    name: str
    login_server: str  # properties.loginServer, e.g. crabc.azurecr.io


@dataclass(frozen=True)
class ImageRef:
    """An image reference split the way Docker reads it (distribution's reference rules).

    The first path component is a registry host only if it holds a '.' or a ':' or is
    ``localhost``; otherwise the image is on Docker Hub, and a one-component name there is an
    official image under ``library/``. A digest wins over a tag; neither means ``latest``.
    """

    registry: str
    repository: str
    reference: str  # a tag, or a digest (sha256:...)

    @classmethod
    def parse(cls, image: str) -> ImageRef:
        text = image.strip()
        name, at, digest = text.partition("@")
        first, slash, rest = name.partition("/")
        if slash and ("." in first or ":" in first or first == "localhost"):
            registry, remainder = first.lower(), rest
        else:
            registry, remainder = DOCKER_HUB, name
        if registry == "index.docker.io":
            registry = DOCKER_HUB
        # A ':' after the last '/' separates the tag (a registry's port comes before it).
        head, colon, tag = remainder.rpartition(":")
        if colon and "/" not in tag:
            remainder = head
        else:
            tag = ""
        if registry == DOCKER_HUB and "/" not in remainder:
            remainder = f"library/{remainder}"
        reference = digest if at else (tag or "latest")
        if not remainder or remainder.startswith("/") or remainder.endswith("/") or not reference:
            raise ValueError(f"{image!r} is not an image reference like REGISTRY/NAME:TAG")
        return cls(registry, remainder, reference)

    @property
    def in_acr(self) -> bool:
        return self.registry.endswith(ACR_SUFFIX)

    @property
    def registry_name(self) -> str:
        """An ACR's resource name as its usual login server spells it (NAME.azurecr.io)."""
        return self.registry.split(".", 1)[0]

    def shown(self) -> str:
        """``NAME:TAG`` or ``NAME@sha256:...``, as ``az acr repository show --image`` takes it."""
        joint = "@" if self.reference.startswith("sha256:") else ":"
        return f"{self.repository}{joint}{self.reference}"


class DeploymentReader(Protocol):
    """The reads the deployment checks make; nothing else of Azure is visible to them."""

    def provider_state(self, namespace: str) -> str: ...

    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota: ...

    def workspace(self) -> Workspace | None: ...

    def role_assignments(self, principal_id: str) -> Sequence[RoleAssignment]: ...

    def role_actions(self, role_definition_id: str) -> Sequence[str]: ...

    def app_setting(self, name: str) -> str | None: ...

    def image_exists(self, image: str) -> bool:
        """Whether an image in an Azure Container Registry exists, read as the signed-in
        identity (ACR's AAD token exchange)."""
        ...

    def public_image_exists(self, image: str) -> bool:
        """Whether an image outside ACR exists, read anonymously (the OCI distribution token
        flow); RefusedError when the registry gives no anonymous pull."""
        ...

    def registries(self) -> Sequence[ContainerRegistry]: ...

    def role_assignments_at(self, scope: str, principal_id: str) -> Sequence[RoleAssignment]:
        """The principal's role assignments at ``scope`` or above it (ARM lists below too)."""
        ...

    def event_subscriptions(self) -> Sequence[EventSubscription]: ...

    def my_permissions(self) -> Sequence[Mapping[str, Any]]:
        """The signed-in account's permission entries at the subscription (Microsoft.
        Authorization/permissions: actions and notActions of each role it holds)."""
        ...

    def get_runs(self) -> AppAnswer: ...

    def probe(self, vm_size: str) -> ProbeOutcome: ...


@dataclass(frozen=True)
class Deployment:
    """Where the deployment is, from azd's environment values."""

    subscription_id: str | None
    resource_group: str | None
    location: str | None
    app_url: str | None
    function_app_name: str | None
    storage_account: str | None
    workspace_name: str | None
    registry_name: str | None
    node_image: str | None
    event_grid_topic: str | None
    manifests_container: str
    controller_principal_id: str | None
    compute_principal_id: str | None
    compute_identity_name: str | None
    application_insights_name: str | None
    # The run queues' own account (infra/modules/run-queues.bicep).
    run_queue_account: str | None = None
    # The AML quota reader role, created apart (infra/hooks/create-quota-role.sh); optional.
    quota_role_id: str | None = None
    source: str = "the environment"
    missing: tuple[str, ...] = field(default=())

    @classmethod
    def from_values(
        cls, values: Mapping[str, str], *, app_url: str | None, source: str
    ) -> Deployment:
        def get(key: str) -> str | None:
            return values.get(key) or None

        return cls(
            subscription_id=get("AZURE_SUBSCRIPTION_ID"),
            resource_group=get("AZURE_RESOURCE_GROUP"),
            location=get("AZURE_LOCATION"),
            app_url=app_url,
            function_app_name=get("AZURE_FUNCTION_APP_NAME"),
            storage_account=get("AZURE_STORAGE_ACCOUNT_NAME"),
            workspace_name=get("AZURE_ML_WORKSPACE_NAME"),
            registry_name=get("AZURE_CONTAINER_REGISTRY_NAME"),
            node_image=get("AZURE_NODE_IMAGE"),
            event_grid_topic=get("AZURE_EVENTGRID_SYSTEM_TOPIC_NAME"),
            manifests_container=get("AZURE_MANIFESTS_CONTAINER") or "manifests",
            controller_principal_id=get("AZURE_CONTROLLER_PRINCIPAL_ID"),
            compute_principal_id=get("AZURE_COMPUTE_PRINCIPAL_ID"),
            compute_identity_name=get("AZURE_COMPUTE_IDENTITY_NAME"),
            application_insights_name=get("AZURE_APPLICATION_INSIGHTS_NAME"),
            run_queue_account=get("AZURE_RUN_QUEUE_ACCOUNT_NAME"),
            quota_role_id=get("AML_QUOTA_READER_ROLE_ID"),
            source=source,
        )

    def lacking(self, *names: str) -> list[str]:
        """The azd value names among ``names`` that this deployment has no value for."""
        attributes = {
            "AZURE_SUBSCRIPTION_ID": self.subscription_id,
            "AZURE_RESOURCE_GROUP": self.resource_group,
            "AZURE_FUNCTION_APP_NAME": self.function_app_name,
            "AZURE_STORAGE_ACCOUNT_NAME": self.storage_account,
            "AZURE_RUN_QUEUE_ACCOUNT_NAME": self.run_queue_account,
            "AZURE_ML_WORKSPACE_NAME": self.workspace_name,
            "AZURE_CONTAINER_REGISTRY_NAME": self.registry_name,
            "AZURE_EVENTGRID_SYSTEM_TOPIC_NAME": self.event_grid_topic,
            "AZURE_CONTROLLER_PRINCIPAL_ID": self.controller_principal_id,
            "AZURE_COMPUTE_PRINCIPAL_ID": self.compute_principal_id,
        }
        return [name for name in names if not attributes.get(name)]


def _no_values(what: str, lacking: list[str], deployment: Deployment) -> CheckResult:
    return skip(
        what,
        f"{', '.join(lacking)} unknown (read from {deployment.source}): run in the folder where "
        "`azd up` ran, or `azd env refresh` there, or export them",
    )


def _refused(what: str, error: RefusedError, needs: str) -> CheckResult:
    return fail(what, f"refused ({error.status}): your identity needs {needs}")


# -- the checks ---------------------------------------------------------------------------------
def check_providers(reader: DeploymentReader, deployment: Deployment) -> CheckResult:
    what = "resource providers " + ", ".join(p.removeprefix("Microsoft.") for p in PROVIDERS)
    if lacking := deployment.lacking("AZURE_SUBSCRIPTION_ID"):
        return _no_values(what, lacking, deployment)
    try:
        states = {namespace: reader.provider_state(namespace) for namespace in PROVIDERS}
    except RefusedError as error:
        return _refused(what, error, "Reader on the subscription")
    except UnavailableError as error:
        return skip(what, str(error))
    unregistered = [ns for ns, state in states.items() if state.lower() != "registered"]
    if unregistered:
        commands = "; ".join(f"az provider register --namespace {ns}" for ns in unregistered)
        listed = ", ".join(f"{ns} ({states[ns]})" for ns in unregistered)
        return fail(what, f"not registered: {listed}: {commands}")
    return ok(f"{what}: registered")


# One return per outcome, each with its own advice: clearer than one shared exit.
def check_quota(  # noqa: PLR0911
    reader: DeploymentReader, deployment: Deployment, vm_size: str, *, low_priority: bool
) -> CheckResult:
    tier = "low-priority" if low_priority else "dedicated"
    what = f"{tier} quota for {vm_size} in {deployment.location or 'the workspace region'}"
    if lacking := deployment.lacking(
        "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_ML_WORKSPACE_NAME"
    ):
        return _no_values(what, lacking, deployment)
    try:
        quota = reader.read_quota(vm_size, low_priority=low_priority)
    except RefusedError as error:
        return fail(
            what,
            f"refused ({error.status}): reading quota needs {' and '.join(QUOTA_ACTIONS)} at "
            "subscription scope: Reader on the subscription, or the 'batchctl AML quota reader' "
            "role (infra/hooks/create-quota-role.sh) assigned to you (the controller's own "
            "grant is checked below)",
        )
    except UnavailableError as error:
        return skip(what, str(error))
    except ComputeError as error:  # the size is not offered here, or its cores are unknown
        return fail(what, f"{error}: pick another --vm-size (az ml compute list-sizes)")
    if quota.limit_cores is None:
        return skip(what, "; ".join(quota.notes) or "no quota record for this size")
    free = quota.available_cores or 0
    nodes = free // max(quota.cores_per_vm, 1)
    detail = f"{free} of {quota.limit_cores} cores free ({nodes} nodes of {quota.cores_per_vm})"
    if nodes < 1:
        return fail(
            f"{what}: {detail}",
            f"request {tier} quota for the {quota.family or vm_size} family in Azure ML studio "
            "(Quotas) or the portal; runs would stay queued",
        )
    return ok(f"{what}: {detail}")


# One return per outcome, each with its own advice: clearer than one shared exit.
def check_workspace(reader: DeploymentReader, deployment: Deployment) -> CheckResult:  # noqa: PLR0911
    what = f"Azure ML workspace {deployment.workspace_name or ''}".strip()
    if lacking := deployment.lacking(
        "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_ML_WORKSPACE_NAME"
    ):
        return _no_values(what, lacking, deployment)
    try:
        workspace = reader.workspace()
    except RefusedError as error:
        return _refused(what, error, f"Reader on resource group {deployment.resource_group}")
    except UnavailableError as error:
        return skip(what, str(error))
    if workspace is None:
        return fail(what, f"not found in {deployment.resource_group}: run `azd provision`")
    if workspace.provisioning_state.lower() != "succeeded":
        return fail(what, f"provisioning state {workspace.provisioning_state}: run `azd provision`")
    if not workspace.identity_principal_id:
        return fail(what, "has no managed identity: run `azd provision` (aml.bicep gives it one)")
    return ok(f"{what} in {workspace.location}, with its system-assigned identity")


# The grants infra/modules/rbac.bicep makes to the two identities, as (role guid, role name,
# scope suffix). tests/test_doctor.py holds them equal to the Bicep's matrix.
_BLOB_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
_BLOB_CONTRIBUTOR = "ba92f5b4-2d11-453d-a403-e96b0029c9fe"
_BLOB_READER = "2a2b9908-6ea1-4ae2-8e65-a410df84e7d1"
_QUEUE_CONTRIBUTOR = "974c5e8b-45b9-4653-ba55-5f855dd0fb88"
_TABLE_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
_ACR_PULL = "7f951dda-4ed3-4680-a7ca-43fe172d538d"
_METRICS_PUBLISHER = "3913510d-42f4-4e42-8a64-420c390055eb"
_ML_COMPUTE_OPERATOR = "e503ece1-11d0-4e8e-8e2c-7a6c3bf38815"
_ML_DATA_SCIENTIST = "f6c7c914-8db3-469d-8ca1-694a8f32e121"
_MI_OPERATOR = "f1a07417-d97a-45cb-824c-7a7467783830"


@dataclass(frozen=True)
class Grant:
    role_id: str
    role_name: str
    scope_kind: str  # an ARM resource type (its last provider segment)
    scope_name: str | None  # the resource's name, where the deployment knows it

    def matches(self, assignment: RoleAssignment) -> bool:
        if not assignment.role_definition_id.lower().endswith(self.role_id):
            return False
        scope = assignment.scope.lower().rstrip("/")
        kind = f"/{self.scope_kind.lower()}/"
        if kind not in scope + "/":
            return False
        if self.scope_name is None:
            return True
        return scope.endswith(f"{kind}{self.scope_name.lower()}")


_ACCOUNT = "providers/Microsoft.Storage/storageAccounts"
_CONTAINERS = "blobServices/default/containers"
_TABLES = "tableServices/default/tables"


def controller_grants(deployment: Deployment) -> list[Grant]:
    account = deployment.storage_account
    return [
        Grant(_BLOB_OWNER, "Storage Blob Data Owner", _ACCOUNT, account),
        Grant(_QUEUE_CONTRIBUTOR, "Storage Queue Data Contributor", _ACCOUNT, account),
        Grant(
            _QUEUE_CONTRIBUTOR,
            "Storage Queue Data Contributor",
            _ACCOUNT,
            deployment.run_queue_account,
        ),
        Grant(_TABLE_CONTRIBUTOR, "Storage Table Data Contributor", _ACCOUNT, account),
        Grant(
            _METRICS_PUBLISHER,
            "Monitoring Metrics Publisher",
            "providers/Microsoft.Insights/components",
            deployment.application_insights_name,
        ),
        Grant(
            _ML_COMPUTE_OPERATOR,
            "AzureML Compute Operator",
            "providers/Microsoft.MachineLearningServices/workspaces",
            deployment.workspace_name,
        ),
        Grant(
            _ML_DATA_SCIENTIST,
            "AzureML Data Scientist",
            "providers/Microsoft.MachineLearningServices/workspaces",
            deployment.workspace_name,
        ),
        Grant(
            _MI_OPERATOR,
            "Managed Identity Operator",
            "providers/Microsoft.ManagedIdentity/userAssignedIdentities",
            deployment.compute_identity_name,
        ),
    ]


def compute_grants(deployment: Deployment) -> list[Grant]:
    return [
        Grant(_BLOB_READER, "Storage Blob Data Reader", _CONTAINERS, "media"),
        Grant(_BLOB_CONTRIBUTOR, "Storage Blob Data Contributor", _CONTAINERS, "outputs"),
        Grant(
            _QUEUE_CONTRIBUTOR,
            "Storage Queue Data Contributor",
            _ACCOUNT,
            deployment.run_queue_account,
        ),
        Grant(_TABLE_CONTRIBUTOR, "Storage Table Data Contributor", _TABLES, "ledger"),
        Grant(
            _ACR_PULL,
            "AcrPull",
            "providers/Microsoft.ContainerRegistry/registries",
            deployment.registry_name,
        ),
    ]


def _role_command(deployment: Deployment, principal: str) -> str:
    return (
        f"az role assignment list --assignee {principal} --all --output table "
        f"(then `azd provision` to restore what is missing)"
    )


def _check_identity(
    reader: DeploymentReader,
    deployment: Deployment,
    who: str,
    principal: str,
    grants: list[Grant],
    *,
    quota_role: bool,
) -> CheckResult:
    what = f"roles of the {who} identity"
    try:
        assignments = list(reader.role_assignments(principal))
    except RefusedError as error:
        return _refused(what, error, "Reader on the resource group (reads role assignments)")
    except UnavailableError as error:
        return skip(what, f"{error}; or run: {_role_command(deployment, principal)}")
    missing = [
        f"{grant.role_name} on {grant.scope_kind.rsplit('/', 1)[-1]} {grant.scope_name or ''}"
        .strip()
        for grant in grants
        if not any(grant.matches(assignment) for assignment in assignments)
    ]  # fmt: skip
    no_quota = quota_role and not _has_quota_role(reader, deployment, assignments)
    if no_quota and deployment.quota_role_id:
        missing.append("the quota reader role at subscription scope (plans go uncapped)")
    if missing:
        return fail(what, f"missing {'; '.join(missing)}: run `azd provision`")
    if excess := excess_storage_grants(assignments, grants, deployment):
        # `azd provision` adds role assignments but never removes one an older Bicep made.
        commands = "; ".join(
            f"az role assignment delete --assignee {principal} "
            f"--role {a.role_definition_id.rsplit('/', 1)[-1]} --scope {a.scope}"
            for a in excess
        )
        return fail(what, f"holds storage grants this deployment no longer makes: {commands}")
    if no_quota:
        # Optional: the deployer may not create role definitions (docs/deploy.md).
        return ok(
            f"{what}: {len(grants)} grants on storage, workspace, registry; no quota reads "
            "(AML_QUOTA_READER_ROLE_ID unset: plans go without the region's quota; an Owner "
            "can run infra/hooks/create-quota-role.sh, then `azd provision`)"
        )
    extra = " and the subscription's quota reads" if quota_role else ""
    return ok(f"{what}: {len(grants)} grants on storage, workspace, registry{extra}")


def excess_storage_grants(
    assignments: list[RoleAssignment], grants: list[Grant], deployment: Deployment
) -> list[RoleAssignment]:
    """Assignments on the deployment's storage accounts (or below) that no expected grant
    accounts for: what an older deployment granted, such as the nodes' queue role on the
    host's account (Durable's control queues) or their write access to runs."""
    accounts = [a for a in (deployment.storage_account, deployment.run_queue_account) if a]
    owned = [f"/providers/microsoft.storage/storageaccounts/{a.lower()}" for a in accounts]
    return [
        assignment
        for assignment in assignments
        if any(f"{account}/" in assignment.scope.lower().rstrip("/") + "/" for account in owned)
        and not any(grant.matches(assignment) for grant in grants)
    ]


def _has_quota_role(
    reader: DeploymentReader, deployment: Deployment, assignments: list[RoleAssignment]
) -> bool:
    subscription = f"/subscriptions/{deployment.subscription_id}".lower()
    for assignment in assignments:
        if assignment.scope.lower().rstrip("/") != subscription:
            continue
        actions = {action.lower() for action in reader.role_actions(assignment.role_definition_id)}
        if all(_allowed(action.lower(), actions) for action in QUOTA_ACTIONS):
            return True
    return False


def _allowed(action: str, granted: set[str]) -> bool:
    # ARM actions allow wildcards: '*', '*/read', 'Microsoft.MachineLearningServices/*'.
    if action in granted or "*" in granted or ("*/read" in granted and action.endswith("/read")):
        return True
    return any(g.endswith("/*") and action.startswith(g[:-1]) for g in granted)


def check_roles(reader: DeploymentReader, deployment: Deployment) -> list[CheckResult]:
    results = []
    for who, principal, grants, quota_role in (
        (
            "controller (app)",
            deployment.controller_principal_id,
            controller_grants(deployment),
            True,
        ),
        ("compute (nodes)", deployment.compute_principal_id, compute_grants(deployment), False),
    ):
        what = f"roles of the {who} identity"
        # Without the run queues' account the queue grant could not be told from the older
        # layout's (the host's account), which is the one the nodes must not have.
        needed = deployment.lacking(
            "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_RUN_QUEUE_ACCOUNT_NAME"
        )
        if principal is None:
            needed.append(
                "AZURE_CONTROLLER_PRINCIPAL_ID" if quota_role else "AZURE_COMPUTE_PRINCIPAL_ID"
            )
        if needed:
            results.append(_no_values(what, needed, deployment))
            continue
        assert principal is not None
        results.append(
            _check_identity(reader, deployment, who, principal, grants, quota_role=quota_role)
        )
    return results


def check_node_image(reader: DeploymentReader, deployment: Deployment) -> CheckResult:
    what = "node image in the registry"
    if lacking := deployment.lacking(
        "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_FUNCTION_APP_NAME"
    ):
        return _no_values(what, lacking, deployment)
    source = f"the app's {NODE_IMAGE_SETTING}"
    try:
        image = reader.app_setting(NODE_IMAGE_SETTING)
    except (RefusedError, UnavailableError) as error:
        # The azd value is what the app was deployed with; say which one was compared.
        image, source = deployment.node_image, f"AZURE_NODE_IMAGE (app settings: {error})"
    if not image:
        return fail(what, f"the app has no {NODE_IMAGE_SETTING}: run `azd provision`")
    what = f"node image {image} ({source})"
    try:
        present = reader.image_exists(image)
    except RefusedError as error:
        return _refused(what, error, "AcrPull (or Reader) on the registry")
    except UnavailableError as error:
        return skip(what, f"{error}; or run: {_acr_show_command(image, deployment.registry_name)}")
    if not present:
        return fail(what, "not in the registry: run `azd hooks run postprovision` (az acr build)")
    return ok(f"{what}: present")


def _acr_show_command(image: str, registry_name: str | None) -> str:
    try:
        ref = ImageRef.parse(image)
    except ValueError:
        return f"az acr repository show --name {registry_name or 'REGISTRY'} --image {image}"
    name = registry_name or (ref.registry_name if ref.in_acr else "REGISTRY")
    return f"az acr repository show --name {name} --image {ref.shown()}"


# -- a run's own image (`submit --image REF`) ---------------------------------------------------
# One return per outcome, each with its own advice: clearer than one shared exit.
def check_run_image(  # noqa: PLR0911
    reader: DeploymentReader, deployment: Deployment, image: str
) -> CheckResult:
    """The image exists, and the run's nodes may pull it: one line.

    Three places an image can be: the deployment's own registry (the compute identity's
    AcrPull there is check_roles' business), another ACR (its pull right is looked up here),
    or a public registry (read anonymously, as the nodes would pull it: no identity).
    """
    what = f"run image {image}"
    try:
        ref = ImageRef.parse(image)
    except ValueError as error:
        return fail(what, f"{error}: give --image as `submit --image` takes it")
    if not ref.in_acr:
        return _check_public_image(reader, what, image, ref, deployment.registry_name)
    own = _own_registry_host(deployment)
    try:
        present = reader.image_exists(image)
    except RefusedError as error:
        return _refused(what, error, f"AcrPull (or Reader) on registry {ref.registry} to see it")
    except UnavailableError as error:
        name = deployment.registry_name if ref.registry == own else None
        return skip(what, f"{error}; or run: {_acr_show_command(image, name)}")
    if not present:
        if ref.reference.startswith("sha256:"):
            return fail(what, f"no manifest {ref.reference} in {ref.registry}: check the digest")
        return fail(
            what,
            f"not in registry {ref.registry}: build and push it (docs/own-work.md: az acr build "
            f"--registry {ref.registry_name} --image {ref.shown()} ...), or fix the tag",
        )
    if ref.registry == own:
        return ok(
            f"{what}: present in the deployment's registry {deployment.registry_name}; the nodes "
            "pull it with the compute identity's AcrPull there (checked with its roles)"
        )
    return _check_other_registry_pull(reader, deployment, what, ref)


def _own_registry_host(deployment: Deployment) -> str | None:
    # The login server azd deployed the node image to names the registry exactly; the name
    # alone is the fallback (a registry's usual login server is NAME.azurecr.io, lower case).
    if deployment.node_image:
        try:
            return ImageRef.parse(deployment.node_image).registry
        except ValueError:
            pass
    if deployment.registry_name:
        return f"{deployment.registry_name.lower()}{ACR_SUFFIX}"
    return None


def _check_public_image(
    reader: DeploymentReader, what: str, image: str, ref: ImageRef, registry_name: str | None
) -> CheckResult:
    # AML starts the nodes' container with no registry credentials of ours: an image outside
    # ACR is pulled anonymously, so an anonymous read is the nodes' own view of it.
    command = f"docker manifest inspect {image}"
    try:
        present = reader.public_image_exists(image)
    except RefusedError as error:
        return fail(
            what,
            f"{ref.registry} refused an anonymous pull ({error.status}: {error}): the image is "
            "private or absent, and the nodes pull it without credentials; make it public, or "
            f"copy it to the deployment's registry (az acr import --name "
            f"{registry_name or 'REGISTRY'} --source {ref.registry}/{ref.shown()}) and pass "
            "that reference",
        )
    except UnavailableError as error:
        return skip(what, f"{error}; or run: {command}")
    if not present:
        return fail(what, f"not found at {ref.registry}: check the name and tag ({command})")
    return ok(f"{what}: public at {ref.registry}, present; pulled anonymously: no identity needed")


# One return per outcome, each with its own advice: clearer than one shared exit.
def _check_other_registry_pull(  # noqa: PLR0911
    reader: DeploymentReader, deployment: Deployment, what: str, ref: ImageRef
) -> CheckResult:
    found = f"present in {ref.registry}"
    principal = deployment.compute_principal_id
    if lacking := deployment.lacking("AZURE_SUBSCRIPTION_ID", "AZURE_COMPUTE_PRINCIPAL_ID"):
        return skip(
            what,
            f"{found}; the compute identity's pull right there is unknown: "
            f"{', '.join(lacking)} unknown (read from {deployment.source})",
        )
    assert principal is not None
    by_hand = (
        f"az role assignment list --assignee {principal} --include-inherited --scope "
        f"$(az acr show --name {ref.registry_name} --query id --output tsv)"
    )
    try:
        registry = next(
            (r for r in reader.registries() if r.login_server.lower() == ref.registry), None
        )
    except RefusedError as error:
        return _refused(what, error, "Reader on the subscription (lists its container registries)")
    except UnavailableError as error:
        return skip(what, f"{found}; {error}; check the compute identity's pull right: {by_hand}")
    if registry is None:
        return skip(
            what,
            f"{found}, a registry not in subscription {deployment.subscription_id} (or not "
            f"visible to you): check the compute identity's pull right there: {by_hand}",
        )
    try:
        granted = _pull_role(reader, registry, principal)
    except RefusedError as error:
        return _refused(what, error, f"Reader on registry {registry.name} (its role assignments)")
    except UnavailableError as error:
        return skip(what, f"{found}; {error}; check the compute identity's pull right: {by_hand}")
    if granted is None:
        who = deployment.compute_identity_name or principal
        return fail(
            what,
            f"{found}, but the compute identity {who} may not pull from it: az role assignment "
            f"create --assignee-object-id {principal} --assignee-principal-type "
            f"ServicePrincipal --role AcrPull --scope {registry.id}",
        )
    return ok(f"{what}: {found}; the compute identity may pull it ({granted})")


def _pull_role(reader: DeploymentReader, registry: ContainerRegistry, principal: str) -> str | None:
    """What gives ``principal`` pull on ``registry`` (AcrPull, or a role whose actions cover
    the pull action, at the registry or above it), or None."""
    target = registry.id.lower().rstrip("/")
    for assignment in reader.role_assignments_at(registry.id, principal):
        scope = assignment.scope.lower().rstrip("/")
        # ARM lists the principal's assignments below the scope too; only at or above count.
        if target != scope and not target.startswith(f"{scope}/"):
            continue
        where = "on the registry" if target == scope else f"at {assignment.scope}"
        if assignment.role_definition_id.lower().endswith(_ACR_PULL):
            return f"AcrPull {where}"
        actions = {a.lower() for a in reader.role_actions(assignment.role_definition_id)}
        if _allowed(PULL_ACTION.lower(), actions):
            role = assignment.role_definition_id.rsplit("/", 1)[-1]
            return f"role {role}, which allows {PULL_ACTION}, {where}"
    return None


_OLD_BLOB_WEBHOOK = "/runtime/webhooks/blobs"


def subscription_problem(subscription: EventSubscription) -> str | None:
    """What is wrong with the manifests' event subscription, if anything."""
    if subscription.provisioning_state.lower() != "succeeded":
        return f"{subscription.name} is {subscription.provisioning_state}"
    if subscription.endpoint_base_url.rstrip("/").lower().endswith(_OLD_BLOB_WEBHOOK):
        # Deployments before the Event Grid trigger sent events to the blob trigger, which
        # the app no longer has: every upload would now fail to start a run.
        return (
            f"{subscription.name} still sends to the blob extension's webhook "
            f"({subscription.endpoint_base_url}), which this app no longer serves"
        )
    return None


def check_deployer(reader: DeploymentReader, deployment: Deployment) -> CheckResult:
    """May the signed-in account run `azd up` here? (``batchctl doctor --deployer``)"""
    what = "your roles allow `azd up` (docs/deploy.md)"
    if lacking := deployment.lacking("AZURE_SUBSCRIPTION_ID"):
        return _no_values(what, lacking, deployment)
    subscription = deployment.subscription_id or ""
    try:
        permissions = list(reader.my_permissions())
    except RefusedError as error:
        return _refused(what, error, "any role on the subscription (to read your permissions)")
    except UnavailableError as error:
        return skip(what, str(error))
    if missing := missing_actions(permissions):
        return fail(what, verdict(missing, subscription))
    return ok(f"{what}: {len(DEPLOYER_ACTIONS)} actions on subscription {subscription}")


def check_event_subscription(reader: DeploymentReader, deployment: Deployment) -> CheckResult:
    container = deployment.manifests_container
    what = f"Event Grid subscription BlobCreated({container}) -> start_run_from_blob"
    if lacking := deployment.lacking(
        "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "AZURE_EVENTGRID_SYSTEM_TOPIC_NAME"
    ):
        return _no_values(what, lacking, deployment)
    try:
        subscriptions = list(reader.event_subscriptions())
    except RefusedError as error:
        return _refused(what, error, f"Reader on resource group {deployment.resource_group}")
    except UnavailableError as error:
        return skip(what, str(error))
    prefix = f"/blobServices/default/containers/{container}/"
    for subscription in subscriptions:
        if (
            subscription.subject_begins_with == prefix
            and BLOB_CREATED in subscription.included_event_types
            and subscription.endpoint_type.lower() == "webhook"
        ):
            if problem := subscription_problem(subscription):
                return fail(what, f"{problem}: run `azd hooks run postdeploy`")
            return ok(f"{what}: {subscription.name}")
    return fail(
        what,
        "none: uploads to manifests start nothing; run `azd hooks run postdeploy` "
        "(or start runs with batchctl submit)",
    )


# One return per outcome, each with its own advice: clearer than one shared exit.
def check_app(reader: DeploymentReader, deployment: Deployment, has_key: bool) -> CheckResult:  # noqa: PLR0911
    what = f"app {deployment.app_url} answers GET /api/runs with the key"
    if not deployment.app_url:
        return skip(what, "no app URL: --app URL, BATCHCTL_APP_URL or the azd environment")
    answer = reader.get_runs()
    key_command = (
        'export BATCHCTL_FUNCTION_KEY="$(az functionapp keys list --resource-group '
        f"{deployment.resource_group or 'RG'} --name {deployment.function_app_name or 'APP'} "
        '--query functionKeys.default --output tsv)"'
    )
    if answer.status is None:
        return fail(what, f"{answer.problem}: is the app deployed (`azd deploy`)?")
    if answer.status == 200:
        return ok(what)
    if answer.status in (401, 403):
        if not has_key:
            return fail(what, f"BATCHCTL_FUNCTION_KEY is not set: {key_command}")
        return fail(what, f"the key was refused ({answer.status}): {key_command}")
    if answer.status == 404:
        return fail(what, "404: not a batchctl app, or its code is not deployed: `azd deploy`")
    return fail(
        what, f"HTTP {answer.status} {answer.problem}".strip() + ": see Application Insights"
    )


def check_probe(reader: DeploymentReader, deployment: Deployment, vm_size: str) -> CheckResult:
    what = f"probe: 1-item run on a 1-node {vm_size} cluster (starts one node)"
    try:
        outcome = reader.probe(vm_size)
    except RefusedError as error:
        return _refused(what, error, "Storage Blob Data Contributor on media and manifests")
    except UnavailableError as error:
        return skip(what, str(error))
    if outcome.succeeded:
        return ok(f"{what}: {outcome.summary}")
    return fail(what, f"{outcome.summary}: batchctl report RUN_ID, and the job logs in ML studio")


def deployment_checks(
    reader: DeploymentReader,
    deployment: Deployment,
    *,
    vm_size: str,
    low_priority: bool,
    has_key: bool,
    probe: bool,
    image: str | None = None,
) -> list[Callable[[], list[CheckResult]]]:
    """The deployment checks in print order; each gives one line (roles give two). ``image``
    (a run's own, ``--image``) adds its check after the node image's."""
    checks: list[Callable[[], list[CheckResult]]] = [
        lambda: [check_providers(reader, deployment)],
        lambda: [check_quota(reader, deployment, vm_size, low_priority=low_priority)],
        lambda: [check_workspace(reader, deployment)],
        lambda: check_roles(reader, deployment),
        lambda: [check_node_image(reader, deployment)],
    ]
    if image is not None:
        checks.append(lambda: [check_run_image(reader, deployment, image)])
    checks += [
        lambda: [check_event_subscription(reader, deployment)],
        lambda: [check_app(reader, deployment, has_key)],
    ]
    if probe:
        checks.append(lambda: [check_probe(reader, deployment, vm_size)])
    else:
        checks.append(
            lambda: [
                skip(
                    f"probe: 1-item run on a 1-node {vm_size} cluster",
                    "costs a node start: add --probe",
                )
            ]
        )
    return checks
