"""The real DeploymentReader: the few Azure reads `batchctl doctor --app` makes.

Signed in with DefaultAzureCredential (``az login`` on a workstation), the one credential
batchctl's storage adapter builds. ARM reads go through azure-core's own pipeline (bearer
token, retries) rather than one azure-mgmt-* package per resource type: those packages are
not batchctl dependencies (they only arrive with azureml-core), and each read here is one
documented GET or POST. The quota is read through the AML backend's own path
(``AmlBackend.read_quota`` over azure-ai-ml), so the doctor sees what planning will see. The
app is asked with batchctl's own AppClient, which sends the key only as a header.

Images are read where the nodes would pull them from: an Azure Container Registry with an
AAD token exchanged for a registry one (as the signed-in identity), any other registry
anonymously through the OCI distribution spec's token flow (a 401 to ``GET /v2/`` names a
Bearer realm, which hands out a pull token for one repository without credentials).

No Azure is reachable where this was written: the reads follow the REST reference of each
operation (api-versions below), and tests drive the checks with a fake reader instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from batchctl.compute.base import Quota
from batchctl.doctor.deployer import permissions_path
from batchctl.doctor.deployment import (
    AppAnswer,
    ContainerRegistry,
    Deployment,
    EventSubscription,
    ImageRef,
    ProbeOutcome,
    RefusedError,
    RoleAssignment,
    UnavailableError,
    Workspace,
)

ARM = "https://management.azure.com"
ARM_SCOPE = f"{ARM}/.default"
PROVIDERS_API = "2021-04-01"
WORKSPACE_API = "2024-10-01"
AUTHORIZATION_API = "2022-04-01"
WEB_API = "2023-12-01"
EVENTGRID_API = "2022-06-15"
REGISTRY_API = "2023-07-01"  # the version infra/modules/aml.bicep declares its registry with
# Docker Hub's short name is not where its registry API answers.
_REGISTRY_API_HOSTS = {"docker.io": "registry-1.docker.io"}
# A registry read waits this long to connect and to read (a doctor line must not hang).
_REGISTRY_TIMEOUTS = {"connection_timeout": 10, "read_timeout": 30}
_MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    )
)
# AmlBackend.read_quota turns a refused listing into an unknown quota whose first note says
# so with the status in parentheses (batchctl.compute.aml.quota.unknown_quota).
_QUOTA_REFUSED_NOTE = re.compile(r"^quota unknown: .*\((40[13])\)")
PROBE_TIMEOUT_S = 1800.0


class AzureDeploymentReader:
    """DeploymentReader over ARM, the AML backend, ACR's registry API and the app's API."""

    def __init__(
        self, deployment: Deployment, *, key: str | None, credential: Any | None = None
    ) -> None:
        """``credential``: an azure-core TokenCredential to use instead of the
        DefaultAzureCredential built on first use."""
        self._deployment = deployment
        self._key = key
        self._credential: Any = credential
        self._pipeline: Any = None

    # -- plumbing ---------------------------------------------------------------------------
    def _get_credential(self) -> Any:
        if self._credential is None:
            from batchctl.settings import StorageSettings
            from batchctl.storage.clients import sync_credential

            # Any managed-identity StorageSettings gives DefaultAzureCredential; the URL
            # only fills required fields and is never contacted here.
            url = "https://unused.blob.core.windows.net"
            settings = StorageSettings(
                storage_auth="managed_identity", blob_url=url, queue_url=url, table_url=url
            )
            self._credential = sync_credential(settings)
        return self._credential

    def _client(self) -> Any:
        if self._pipeline is None:
            from azure.core import PipelineClient
            from azure.core.pipeline.policies import (
                BearerTokenCredentialPolicy,
                HeadersPolicy,
                RetryPolicy,
                UserAgentPolicy,
            )

            self._pipeline = PipelineClient(
                base_url=ARM,
                policies=[
                    HeadersPolicy(),
                    UserAgentPolicy("batchctl-doctor"),
                    RetryPolicy(retry_total=3),
                    BearerTokenCredentialPolicy(self._get_credential(), ARM_SCOPE),
                ],
            )
        return self._pipeline

    def _arm(self, method: str, path: str, api_version: str, **params: str) -> Any | None:
        """The JSON of one ARM call; None for 404; RefusedError for 401/403."""
        from azure.core.exceptions import ClientAuthenticationError
        from azure.core.rest import HttpRequest

        url = path if path.startswith("https://") else f"{ARM}{path}"
        if "api-version=" not in url:
            params = {"api-version": api_version, **params}
        request = HttpRequest(method, url, params=params)
        try:
            response = self._client().send_request(request)
        except ClientAuthenticationError as error:
            raise UnavailableError(
                f"cannot sign in ({_first_line(error)}): run `az login`"
            ) from None
        if response.status_code == 404:
            return None
        if response.status_code in (401, 403):
            raise RefusedError(response.status_code, _arm_message(response))
        if response.status_code >= 400:
            raise UnavailableError(f"ARM answered {response.status_code}: {_arm_message(response)}")
        return response.json() if response.content else {}

    def _pages(self, path: str, api_version: str, **params: str) -> Iterator[dict[str, Any]]:
        page = self._arm("GET", path, api_version, **params)
        while page:
            yield from page.get("value", [])
            next_link = page.get("nextLink")
            page = self._arm("GET", next_link, api_version) if next_link else None

    def _rg_path(self) -> str:
        d = self._deployment
        return f"/subscriptions/{d.subscription_id}/resourceGroups/{d.resource_group}"

    # -- DeploymentReader -------------------------------------------------------------------
    def provider_state(self, namespace: str) -> str:
        path = f"/subscriptions/{self._deployment.subscription_id}/providers/{namespace}"
        answer = self._arm("GET", path, PROVIDERS_API)
        return str((answer or {}).get("registrationState") or "NotRegistered")

    def read_quota(self, vm_size: str, *, low_priority: bool) -> Quota:
        try:
            from batchctl.compute.aml.gateway_v2 import create_aml_backend
            from batchctl.compute.aml.settings import AmlSettings
        except ImportError:
            raise UnavailableError(
                "azure-ai-ml is not installed: pip install -e '.[aml]'"
            ) from None
        d = self._deployment
        aml = AmlSettings(
            subscription_id=d.subscription_id or "",
            resource_group=d.resource_group or "",
            workspace_name=d.workspace_name or "",
            node_image=d.node_image or "unused",
        )
        from batchctl.settings import StorageSettings

        url = f"https://{d.storage_account or 'unused'}.blob.core.windows.net"
        storage = StorageSettings(
            storage_auth="managed_identity", blob_url=url, queue_url=url, table_url=url
        )
        backend = create_aml_backend(storage, aml, credential=self._get_credential())
        quota = backend.read_quota(vm_size, low_priority=low_priority)
        refused = _QUOTA_REFUSED_NOTE.match(quota.notes[0]) if quota.notes else None
        if refused and quota.limit_cores is None:
            raise RefusedError(int(refused.group(1)), quota.notes[0])
        return quota

    def workspace(self) -> Workspace | None:
        d = self._deployment
        path = (
            f"{self._rg_path()}/providers/Microsoft.MachineLearningServices/workspaces/"
            f"{d.workspace_name}"
        )
        answer = self._arm("GET", path, WORKSPACE_API)
        if answer is None:
            return None
        identity = answer.get("identity") or {}
        return Workspace(
            name=str(answer.get("name") or d.workspace_name),
            location=str(answer.get("location") or ""),
            identity_principal_id=identity.get("principalId") or None,
            provisioning_state=str((answer.get("properties") or {}).get("provisioningState") or ""),
        )

    def role_assignments(self, principal_id: str) -> Sequence[RoleAssignment]:
        # At the resource group with principalId: the principal's assignments at, above
        # (the subscription) and below (the group's resources, containers, tables) it.
        return self.role_assignments_at(self._rg_path(), principal_id)

    def role_assignments_at(self, scope: str, principal_id: str) -> Sequence[RoleAssignment]:
        path = f"{scope.rstrip('/')}/providers/Microsoft.Authorization/roleAssignments"
        return [
            RoleAssignment(
                role_definition_id=str(item["properties"]["roleDefinitionId"]),
                scope=str(item["properties"]["scope"]),
            )
            for item in self._pages(
                path, AUTHORIZATION_API, **{"$filter": f"principalId eq '{principal_id}'"}
            )
        ]

    def role_actions(self, role_definition_id: str) -> Sequence[str]:
        answer = self._arm("GET", role_definition_id, AUTHORIZATION_API) or {}
        permissions = (answer.get("properties") or {}).get("permissions") or []
        return [action for p in permissions for action in p.get("actions", [])]

    def app_setting(self, name: str) -> str | None:
        path = (
            f"{self._rg_path()}/providers/Microsoft.Web/sites/"
            f"{self._deployment.function_app_name}/config/appsettings/list"
        )
        # The answer holds every app setting; only the one asked for leaves this method.
        answer = self._arm("POST", path, WEB_API) or {}
        value = (answer.get("properties") or {}).get(name)
        return str(value) if value else None

    def image_exists(self, image: str) -> bool:
        """HEAD of the image's manifest, with a registry token exchanged for the ARM one."""
        ref = ImageRef.parse(image)
        token = self._registry_token(ref.registry, ref.repository)
        return _manifest_present(ref, {"Authorization": f"Bearer {token}"})

    def _registry_token(self, login_server: str, repository: str) -> str:
        # ACR's documented AAD flow: exchange an ARM access token for a refresh token, then
        # that for a pull token scoped to one repository.
        from azure.core.exceptions import ClientAuthenticationError
        from azure.core.rest import HttpRequest

        base = _registry_base(login_server)
        try:
            aad = self._get_credential().get_token(ARM_SCOPE).token
        except ClientAuthenticationError as error:
            raise UnavailableError(
                f"cannot sign in ({_first_line(error)}): run `az login`"
            ) from None
        exchange = _registry_send(
            login_server,
            HttpRequest(
                "POST",
                f"{base}/oauth2/exchange",
                data={"grant_type": "access_token", "service": login_server, "access_token": aad},
            ),
        )
        if exchange.status_code in (401, 403):
            raise RefusedError(exchange.status_code, "the registry refused the token exchange")
        if exchange.status_code != 200:
            raise UnavailableError(f"registry token exchange answered {exchange.status_code}")
        refresh = exchange.json()["refresh_token"]
        scoped = _registry_send(
            login_server,
            HttpRequest(
                "POST",
                f"{base}/oauth2/token",
                data={
                    "grant_type": "refresh_token",
                    "service": login_server,
                    "scope": f"repository:{repository}:pull",
                    "refresh_token": refresh,
                },
            ),
        )
        if scoped.status_code != 200:
            raise RefusedError(scoped.status_code, "no pull right on the repository")
        return str(scoped.json()["access_token"])

    def public_image_exists(self, image: str) -> bool:
        """HEAD of the manifest as an anonymous client: the OCI distribution token flow."""
        from azure.core.rest import HttpRequest

        ref = ImageRef.parse(image)
        ping = _registry_send(
            ref.registry, HttpRequest("GET", f"{_registry_base(ref.registry)}/v2/")
        )
        if ping.status_code == 200:  # a registry that serves without any token (mcr)
            return _manifest_present(ref, {})
        if ping.status_code != 401:
            raise UnavailableError(f"{ref.registry} answered {ping.status_code} to GET /v2/")
        challenge = _bearer_challenge(ping.headers.get("WWW-Authenticate", ""))
        if challenge is None or not challenge.get("realm"):
            # Basic (or no) challenge: only credentials open it, and the nodes have none.
            raise RefusedError(401, "it asks for credentials, not for an anonymous token")
        params = {"scope": f"repository:{ref.repository}:pull"}
        if challenge.get("service"):
            params["service"] = challenge["service"]
        realm = challenge["realm"]
        answer = _registry_send(ref.registry, HttpRequest("GET", realm, params=params))
        if answer.status_code in (401, 403):
            raise RefusedError(answer.status_code, "no anonymous pull token")
        if answer.status_code != 200:
            raise UnavailableError(f"the token service {realm} answered {answer.status_code}")
        try:
            body = answer.json()
        except ValueError:
            body = None
        # The spec names the field 'token'; OAuth2-shaped services answer 'access_token'.
        token = (body.get("token") or body.get("access_token")) if isinstance(body, dict) else None
        if not token:
            raise UnavailableError(f"the token service {realm} answered without a token")
        return _manifest_present(ref, {"Authorization": f"Bearer {token}"})

    def registries(self) -> Sequence[ContainerRegistry]:
        path = (
            f"/subscriptions/{self._deployment.subscription_id}/providers/"
            "Microsoft.ContainerRegistry/registries"
        )
        return [
            ContainerRegistry(
                id=str(item.get("id") or ""),
                name=str(item.get("name") or ""),
                login_server=str((item.get("properties") or {}).get("loginServer") or ""),
            )
            for item in self._pages(path, REGISTRY_API)
        ]

    def event_subscriptions(self) -> Sequence[EventSubscription]:
        path = (
            f"{self._rg_path()}/providers/Microsoft.EventGrid/systemTopics/"
            f"{self._deployment.event_grid_topic}/eventSubscriptions"
        )
        found = []
        for item in self._pages(path, EVENTGRID_API):
            properties = item.get("properties") or {}
            filters = properties.get("filter") or {}
            destination = properties.get("destination") or {}
            found.append(
                EventSubscription(
                    name=str(item.get("name") or ""),
                    provisioning_state=str(properties.get("provisioningState") or ""),
                    endpoint_type=str(destination.get("endpointType")),
                    subject_begins_with=str(filters.get("subjectBeginsWith") or ""),
                    included_event_types=tuple(filters.get("includedEventTypes") or ()),
                    endpoint_base_url=str(
                        (destination.get("properties") or {}).get("endpointBaseUrl") or ""
                    ),
                )
            )
        return found

    def my_permissions(self) -> Sequence[Mapping[str, Any]]:
        path = permissions_path(str(self._deployment.subscription_id))
        return list(self._pages(path, AUTHORIZATION_API))

    def get_runs(self) -> AppAnswer:
        from batchctl.client import AppClient, AppError

        url = self._deployment.app_url
        if not url:
            return AppAnswer(None, "no app URL")
        try:
            client = AppClient(url, self._key, attempts=2)
            # The client's own GET (key as a header, retries on 5xx): the route `batchctl
            # status` lists runs with.
            response = client._request("GET", client._api("runs"), retry=True)
        except AppError as error:
            return AppAnswer(None, str(error))
        return AppAnswer(response.status)

    def probe(self, vm_size: str) -> ProbeOutcome:
        """Upload a generated 1 s video to media, then `batchctl trial` one row on one node."""
        from batchctl.client import client_storage_settings
        from batchctl.doctor.local import make_probe_video
        from batchctl.storage.blobs import BlobStore

        if not self._deployment.app_url:
            raise UnavailableError("no app URL")
        settings = client_storage_settings()
        with tempfile.TemporaryDirectory(prefix="batchctl-doctor-") as folder:
            work = Path(folder)
            video = work / "probe.mp4"
            try:
                make_probe_video(video, "ffmpeg")
            except (OSError, RuntimeError) as error:
                raise UnavailableError(f"no test video ({error}): install ffmpeg") from None
            name = f"_doctor/probe-{time.strftime('%Y%m%d-%H%M%S')}.mp4"
            store = BlobStore(settings)
            try:
                store.upload_file(settings.media_container, name, video)
            except Exception as error:  # the storage SDK's errors, worded by status below
                if getattr(error, "status_code", None) in (401, 403):
                    raise RefusedError(
                        int(getattr(error, "status_code", 403)), str(error)
                    ) from None
                raise UnavailableError(
                    f"upload to {settings.media_container} failed: {error}"
                ) from None
            manifest = work / "probe.csv"
            manifest.write_text(
                f"id,video\nprobe,{store.url(settings.media_container, name)}\n", encoding="utf-8"
            )
            command = [
                sys.executable, "-m", "batchctl", "trial", str(manifest), "--app",
                self._deployment.app_url, "--rows", "1", "--trial-nodes", "1",
                "--vm-size", vm_size, "--out", str(work / "out"), "--json",
            ]  # fmt: skip
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
                env=dict(os.environ), check=False,
            )  # fmt: skip
        answer = _last_json(done.stdout)
        if done.returncode == 0:
            return ProbeOutcome(True, f"run {answer.get('run_id', '?')} succeeded")
        return ProbeOutcome(
            False, str(answer.get("error") or f"batchctl trial exited {done.returncode}")
        )


def _registry_base(host: str) -> str:
    # Docker treats loopback registries as insecure by default (plain http); everything
    # else is https.
    api_host = _REGISTRY_API_HOSTS.get(host, host)
    hostname = api_host.rsplit(":", 1)[0]
    scheme = "http" if hostname == "localhost" or hostname.startswith("127.") else "https"
    return f"{scheme}://{api_host}"


def _registry_send(host: str, request: Any) -> Any:
    """One registry request, a few retries at most; UnavailableError when it cannot be sent."""
    from azure.core import PipelineClient
    from azure.core.exceptions import AzureError
    from azure.core.pipeline.policies import (
        HeadersPolicy,
        RedirectPolicy,
        RetryPolicy,
        UserAgentPolicy,
    )

    client: Any = PipelineClient(
        base_url=_registry_base(host),
        policies=[
            HeadersPolicy(),
            UserAgentPolicy("batchctl-doctor"),
            # One retry of a lost connection, none of a status: azure-core would sleep out
            # any Retry-After of a rate limit (Docker Hub's 429), and a doctor line must end
            # in a skip instead.
            RetryPolicy(retry_total=1, retry_status=0, retry_backoff_max=5, timeout=60),
            RedirectPolicy(),
        ],
    )
    try:
        return client.send_request(request, **_REGISTRY_TIMEOUTS)
    except AzureError as error:
        raise UnavailableError(f"cannot reach {host} ({_first_line(error)})") from None


def _manifest_present(ref: ImageRef, headers: dict[str, str]) -> bool:
    from azure.core.rest import HttpRequest

    response = _registry_send(
        ref.registry,
        HttpRequest(
            "HEAD",
            f"{_registry_base(ref.registry)}/v2/{ref.repository}/manifests/{ref.reference}",
            headers={**headers, "Accept": _MANIFEST_TYPES},
        ),
    )
    if response.status_code == 200:
        return True
    if response.status_code == 404:
        return False
    if response.status_code in (401, 403):
        raise RefusedError(response.status_code, "the registry refused the pull token")
    raise UnavailableError(f"{ref.registry} answered {response.status_code} for the manifest")


def _bearer_challenge(header: str) -> dict[str, str] | None:
    """The parameters of a ``Bearer realm="...",service="..."`` challenge; None otherwise."""
    scheme, _, params = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return {key.lower(): value for key, value in re.findall(r'(\w+)="([^"]*)"', params)}


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _arm_message(response: Any) -> str:
    try:
        body = response.json()
    except (ValueError, json.JSONDecodeError):
        return f"HTTP {response.status_code}"
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return f"{error.get('code', '')}: {error.get('message', '')}".strip(": ")
    return f"HTTP {response.status_code}"


def _last_json(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


__all__ = ["AzureDeploymentReader"]
