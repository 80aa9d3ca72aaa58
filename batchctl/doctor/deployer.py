"""What the person running `azd up` must be allowed to do, and whether they are.

``DEPLOYER_ACTIONS`` is what `azd up` asks of Azure Resource Manager as the deployer: the write
of every resource type infra/ declares (the read of those it only references), the nested
deployments of its modules, and what its hooks call. tests/test_deployer_roles.py derives the
Bicep part from infra/ and holds this list equal to it, and checks that the roles
docs/deploy.md names grant all of it.

The check itself reads the caller's effective permissions at the subscription
(``GET /subscriptions/{id}/providers/Microsoft.Authorization/permissions``: one entry per role
the caller holds there or above, each ``actions`` less its ``notActions``) and names what is
missing. ``batchctl doctor`` runs it through its ARM reader; the azd preprovision hook runs
this module (``python3 -m batchctl.doctor.deployer``, standard library only) through ``az
rest``, before anything is created.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from functools import cache
from typing import Any

# The resource types infra/*.bicep declares (write) or only references (read), and the
# nested deployments of its modules. Equal to what tests/test_deployer_roles.py derives.
BICEP_ACTIONS = (
    "Microsoft.Authorization/roleAssignments/write",
    "Microsoft.ContainerRegistry/registries/read",
    "Microsoft.ContainerRegistry/registries/write",
    "Microsoft.EventGrid/systemTopics/eventSubscriptions/write",
    "Microsoft.EventGrid/systemTopics/read",
    "Microsoft.EventGrid/systemTopics/write",
    "Microsoft.Insights/components/read",
    "Microsoft.Insights/components/write",
    "Microsoft.KeyVault/vaults/write",
    "Microsoft.MachineLearningServices/workspaces/read",
    "Microsoft.MachineLearningServices/workspaces/write",
    "Microsoft.ManagedIdentity/userAssignedIdentities/assign/action",
    "Microsoft.ManagedIdentity/userAssignedIdentities/read",
    "Microsoft.ManagedIdentity/userAssignedIdentities/write",
    "Microsoft.OperationalInsights/workspaces/write",
    "Microsoft.Resources/deployments/write",
    "Microsoft.Resources/subscriptions/resourceGroups/write",
    "Microsoft.Storage/storageAccounts/blobServices/containers/read",
    "Microsoft.Storage/storageAccounts/blobServices/containers/write",
    "Microsoft.Storage/storageAccounts/blobServices/read",
    "Microsoft.Storage/storageAccounts/blobServices/write",
    "Microsoft.Storage/storageAccounts/queueServices/write",
    "Microsoft.Storage/storageAccounts/read",
    "Microsoft.Storage/storageAccounts/tableServices/read",
    "Microsoft.Storage/storageAccounts/tableServices/tables/read",
    "Microsoft.Storage/storageAccounts/tableServices/tables/write",
    "Microsoft.Storage/storageAccounts/tableServices/write",
    "Microsoft.Storage/storageAccounts/write",
    "Microsoft.Web/serverfarms/write",
    "Microsoft.Web/sites/basicPublishingCredentialsPolicies/write",
    "Microsoft.Web/sites/host/listKeys/action",
    "Microsoft.Web/sites/read",
    "Microsoft.Web/sites/write",
)
# What the azd hooks call beyond the Bicep (azure.yaml), each with the call that needs it.
HOOK_ACTIONS: Mapping[str, str] = {
    "Microsoft.ContainerRegistry/registries/listBuildSourceUploadUrl/action": (
        "postprovision.sh: az acr build"
    ),
    "Microsoft.ContainerRegistry/registries/scheduleRun/action": "postprovision.sh: az acr build",
    "Microsoft.Web/sites/host/listKeys/action": "postdeploy.sh: az functionapp keys list",
}
DEPLOYER_ACTIONS = tuple(sorted({*BICEP_ACTIONS, *HOOK_ACTIONS}))
DOCUMENTED_ROLES = "Owner, or Contributor plus Role Based Access Control Administrator"
PERMISSIONS_API = "2022-04-01"


@cache
def _pattern(action: str) -> re.Pattern[str]:
    # ARM action strings match case-insensitively and '*' stands for any run of characters
    # ('*', '*/read', 'Microsoft.Authorization/*/Write').
    return re.compile("^" + re.escape(action).replace(r"\*", ".*") + "$", re.IGNORECASE)


def grants(permission: Mapping[str, Any], action: str) -> bool:
    """Whether one permission entry (a role's actions less its notActions) grants ``action``."""
    allowed = any(_pattern(a).match(action) for a in permission.get("actions") or ())
    denied = any(_pattern(n).match(action) for n in permission.get("notActions") or ())
    return allowed and not denied


def missing_actions(
    permissions: Iterable[Mapping[str, Any]], required: Sequence[str] = DEPLOYER_ACTIONS
) -> list[str]:
    """The ``required`` actions that no permission entry grants (roles add up; each role's
    notActions only take away from that role)."""
    entries = list(permissions)
    return [action for action in required if not any(grants(p, action) for p in entries)]


def permissions_path(subscription_id: str) -> str:
    return f"/subscriptions/{subscription_id}/providers/Microsoft.Authorization/permissions"


def verdict(missing: Sequence[str], subscription_id: str) -> str:
    """What to tell a deployer who lacks ``missing`` (one paragraph)."""
    authorization = [a for a in missing if a.lower().startswith("microsoft.authorization/")]
    hint = (
        " Role assignments need Role Based Access Control Administrator (or Owner) besides "
        "Contributor."
        if authorization
        else ""
    )
    return (
        f"the signed-in account may not deploy batchctl to subscription {subscription_id}: it "
        f"lacks {', '.join(missing)}. Deploying needs {DOCUMENTED_ROLES} (docs/deploy.md).{hint}"
    )


# -- the azd preprovision hook's side: through `az rest` ----------------------------------------
def _az_rest_pages(path: str) -> list[dict[str, Any]]:
    az = shutil.which("az")
    if az is None:
        raise RuntimeError("the Azure CLI (az) is not on PATH")
    url: str | None = f"https://management.azure.com{path}?api-version={PERMISSIONS_API}"
    found: list[dict[str, Any]] = []
    while url:
        answer = subprocess.run(
            [az, "rest", "--method", "get", "--url", url, "--only-show-errors"],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if answer.returncode != 0:
            raise RuntimeError(answer.stderr.strip() or f"az rest exited {answer.returncode}")
        page = json.loads(answer.stdout or "{}")
        found.extend(page.get("value") or [])
        url = page.get("nextLink")
    return found


def main(argv: Sequence[str], environ: Mapping[str, str]) -> int:
    """``check``: exit 1 (saying what is missing) when the signed-in account cannot deploy."""
    if list(argv) != ["check"]:
        print("usage: python3 -m batchctl.doctor.deployer check", file=sys.stderr)
        return 2
    subscription_id = environ.get("AZURE_SUBSCRIPTION_ID", "")
    if not subscription_id:
        print("preprovision: AZURE_SUBSCRIPTION_ID is not set; deployer roles not checked")
        return 0
    try:
        permissions = _az_rest_pages(permissions_path(subscription_id))
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as error:
        # Not knowing is no reason to stop a deployment that may well work; say what to have.
        print(f"preprovision: could not read your permissions ({error}); deploying needs "
              f"{DOCUMENTED_ROLES} on subscription {subscription_id}")  # fmt: skip
        return 0
    missing = missing_actions(permissions)
    if missing:
        print(f"preprovision: {verdict(missing, subscription_id)}", file=sys.stderr)
        return 1
    print(f"preprovision: your roles on subscription {subscription_id} allow the deployment")
    if not environ.get("AML_QUOTA_READER_ROLE_ID"):
        print(
            "preprovision: no AML_QUOTA_READER_ROLE_ID: runs will be planned without the "
            "region's GPU quota; an Owner (or User Access Administrator) can create that role "
            "once with infra/hooks/create-quota-role.sh"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], os.environ))
