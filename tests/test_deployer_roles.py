"""The deployer's roles: what `azd up` asks of Azure, against the roles docs/deploy.md names.

The actions are derived from infra/ (every resource type it declares, through tests/bicep.py)
and from the hooks; the roles' action lists are Azure's published built-in role definitions.
The check the preprovision hook runs is exercised for real, with ``az`` on PATH answering as
the Authorization permissions API does.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batchctl.doctor import deployer
from batchctl.doctor.deployer import (
    BICEP_ACTIONS,
    DEPLOYER_ACTIONS,
    DOCUMENTED_ROLES,
    HOOK_ACTIONS,
    missing_actions,
)
from tests.bicep import read_bicep

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"

# Built-in role definitions as Azure publishes them: learn.microsoft.com/azure/
# role-based-access-control/built-in-roles/privileged (Owner, Contributor, Role Based Access
# Control Administrator; the General page lists Contributor the same way). Owner is "actions:
# *" with no notActions; RBAC Administrator's JSON as the same page and azure-rbac-catalog.org
# show it (role f58310d9-a9f6-439a-9e8d-f62e7b41a168, updated 2023-11-10).
BUILT_IN_ROLES: dict[str, dict[str, list[str]]] = {
    "Owner": {"actions": ["*"], "notActions": []},
    "Contributor": {
        "actions": ["*"],
        "notActions": [
            "Microsoft.Authorization/*/Delete",
            "Microsoft.Authorization/*/Write",
            "Microsoft.Authorization/elevateAccess/Action",
            "Microsoft.Blueprint/blueprintAssignments/write",
            "Microsoft.Blueprint/blueprintAssignments/delete",
            "Microsoft.Compute/galleries/share/action",
            "Microsoft.Purview/consents/write",
            "Microsoft.Purview/consents/delete",
            "Microsoft.Resources/deploymentStacks/manageDenySetting/action",
        ],
    },
    "Role Based Access Control Administrator": {
        "actions": [
            "Microsoft.Authorization/roleAssignments/write",
            "Microsoft.Authorization/roleAssignments/delete",
            "*/read",
            "Microsoft.Support/*",
        ],
        "notActions": [],
    },
}

# A Bicep type whose ARM operations carry another path (the resource group is a child of the
# subscription in Microsoft.Resources' operation names).
_OPERATION_TYPES = {
    "Microsoft.Resources/resourceGroups": "Microsoft.Resources/subscriptions/resourceGroups"
}


def actions_the_bicep_needs() -> set[str]:
    """What deploying infra/ asks of ARM, from what its files declare."""
    needed: set[str] = set()
    for path in sorted(INFRA.rglob("*.bicep")):
        bicep = read_bicep(path)
        for declaration in bicep.declarations:
            if declaration.kind == "module":
                needed.add("Microsoft.Resources/deployments/write")
                continue
            kind = _OPERATION_TYPES.get(declaration.type, declaration.type)
            needed.add(f"{kind}/{'read' if declaration.existing else 'write'}")
            if "userAssignedIdentities:" in declaration.body:
                # Attaching a user-assigned identity to a resource is an action on the identity.
                needed.add("Microsoft.ManagedIdentity/userAssignedIdentities/assign/action")
        for kind in re.findall(r"\blistKeys\(resourceId\('([^']+)'", bicep.text):
            needed.add(f"{kind}/listKeys/action")
    return needed


def documented_role_sets() -> list[list[str]]:
    """The role combinations docs/deploy.md's prerequisites name, e.g. [[Owner], [A, B]]."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    assert f"({DOCUMENTED_ROLES})" in " ".join(text.split()), "docs/deploy.md names the roles"
    return [
        [role.strip() for role in option.split(" plus ")]
        for option in DOCUMENTED_ROLES.split(", or ")
    ]


def permissions_of(roles: list[str]) -> list[dict[str, list[str]]]:
    return [BUILT_IN_ROLES[role] for role in roles]


def test_the_deployer_actions_are_what_infra_declares() -> None:
    assert set(BICEP_ACTIONS) == actions_the_bicep_needs()
    assert list(BICEP_ACTIONS) == sorted(BICEP_ACTIONS), "kept sorted, so a diff reads well"


def test_each_hook_action_names_a_call_its_hook_makes() -> None:
    for action, reason in HOOK_ACTIONS.items():
        hook, _, command = reason.partition(": ")
        assert command in (INFRA / "hooks" / hook).read_text(), (action, reason)


@pytest.mark.parametrize("roles", documented_role_sets(), ids=" + ".join)
def test_the_documented_roles_grant_everything_the_deployment_asks(roles: list[str]) -> None:
    assert missing_actions(permissions_of(roles)) == []


def test_no_role_definition_is_created_by_the_deployment() -> None:
    # Contributor excludes Microsoft.Authorization/*/Write and RBAC Administrator grants only
    # role assignments: a roleDefinitions resource in infra/ would fail `azd up` for them.
    created = "Microsoft.Authorization/roleDefinitions/write"
    assert created not in DEPLOYER_ACTIONS
    both = permissions_of(["Contributor", "Role Based Access Control Administrator"])
    assert missing_actions(both, [created]) == [created]


def test_contributor_alone_cannot_deploy_and_is_told_why() -> None:
    missing = missing_actions(permissions_of(["Contributor"]))
    assert missing == ["Microsoft.Authorization/roleAssignments/write"]
    said = deployer.verdict(missing, "sub-1")
    assert "roleAssignments/write" in said and "Role Based Access Control Administrator" in said
    assert DOCUMENTED_ROLES in said


def test_wildcards_match_as_arm_matches_them() -> None:
    reader = {"actions": ["*/read"], "notActions": []}
    assert deployer.grants(reader, "Microsoft.Web/sites/read")
    assert not deployer.grants(reader, "Microsoft.Web/sites/write")
    contributor = BUILT_IN_ROLES["Contributor"]
    assert not deployer.grants(contributor, "microsoft.authorization/roleassignments/WRITE")
    assert deployer.grants(contributor, "Microsoft.Storage/storageAccounts/write")
    # Roles add up; a notAction takes away only from its own role.
    both = permissions_of(["Contributor", "Role Based Access Control Administrator"])
    assert missing_actions(both, ["Microsoft.Authorization/roleAssignments/write"]) == []


# -- the preprovision hook's check, with `az` answering as ARM does -----------------------------
def _fake_az(tmp_path: Path, pages: list[dict[str, Any]] | None, log: Path) -> Path:
    """An `az` whose `rest` answers the permissions API (first page, then its nextLink)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if pages is None:
        body = 'print("ERROR: Please run az login to setup account.", file=sys.stderr); sys.exit(1)'
    else:
        body = (
            f"pages = {pages!r}\n"
            "url = sys.argv[sys.argv.index('--url') + 1]\n"
            "page = pages[1] if 'page=2' in url else pages[0]\n"
            "print(json.dumps(page))"
        )
    script = bin_dir / "az"
    script.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n{body}\n"
    )
    script.chmod(0o755)
    return bin_dir


def _run_check(
    tmp_path: Path, pages: list[dict[str, Any]] | None, **env: str
) -> subprocess.CompletedProcess[str]:
    log = tmp_path / "az.log"
    bin_dir = _fake_az(tmp_path, pages, log)
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.run(
        # -S: no site-packages, as the deployer's plain python3 may have none of ours.
        [sys.executable, "-S", "-m", "batchctl.doctor.deployer", "check"],
        cwd=ROOT, env=environment, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def _page(roles: list[str], next_link: str | None = None) -> dict[str, Any]:
    # The shape of GET .../providers/Microsoft.Authorization/permissions (api 2022-04-01).
    value = [{**BUILT_IN_ROLES[r], "dataActions": [], "notDataActions": []} for r in roles]
    return {"value": value, **({"nextLink": next_link} if next_link else {})}


def test_the_hook_check_stops_a_contributor_naming_what_is_missing(tmp_path: Path) -> None:
    done = _run_check(tmp_path, [_page(["Contributor"])], AZURE_SUBSCRIPTION_ID="sub-1")
    assert done.returncode == 1
    assert "Microsoft.Authorization/roleAssignments/write" in done.stderr
    assert DOCUMENTED_ROLES in done.stderr
    asked = (tmp_path / "az.log").read_text()
    assert "/subscriptions/sub-1/providers/Microsoft.Authorization/permissions" in asked


def test_the_hook_check_reads_every_page_of_permissions(tmp_path: Path) -> None:
    # Contributor on the first page, RBAC Administrator on the second (ARM pages with nextLink).
    next_link = "https://management.azure.com/subscriptions/sub-1/providers/Microsoft.Authorization/permissions?api-version=2022-04-01&page=2"
    pages = [_page(["Contributor"], next_link), _page(["Role Based Access Control Administrator"])]
    done = _run_check(tmp_path, pages, AZURE_SUBSCRIPTION_ID="sub-1", AML_QUOTA_READER_ROLE_ID="")
    assert done.returncode == 0, done.stderr
    assert "allow the deployment" in done.stdout
    assert "create-quota-role.sh" in done.stdout  # the optional quota role is mentioned
    assert len((tmp_path / "az.log").read_text().splitlines()) == 2


def test_the_hook_check_does_not_block_when_it_cannot_read(tmp_path: Path) -> None:
    done = _run_check(tmp_path, None, AZURE_SUBSCRIPTION_ID="sub-1")
    assert done.returncode == 0
    assert "could not read your permissions" in done.stdout and DOCUMENTED_ROLES in done.stdout


def test_preprovision_checks_before_it_changes_anything(tmp_path: Path) -> None:
    # The hook stops at the check: `azd env set` (its first change) is never reached.
    log = tmp_path / "az.log"
    bin_dir = _fake_az(tmp_path, [_page(["Contributor"])], log)
    (bin_dir / "azd").write_text(f'#!/bin/sh\necho azd "$@" >> {tmp_path / "azd.log"}\n')
    (bin_dir / "azd").chmod(0o755)
    python_dir = Path(sys.executable).parent
    environment = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), str(python_dir), os.environ["PATH"]]),
        "AZURE_SUBSCRIPTION_ID": "sub-1",
        "PYTHONPATH": str(ROOT),
    }
    done = subprocess.run(
        ["sh", str(INFRA / "hooks" / "preprovision.sh")], env=environment,
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 1 and "roleAssignments/write" in done.stderr
    assert not (tmp_path / "azd.log").exists()


def test_the_quota_role_is_created_apart_with_only_the_quota_reads() -> None:
    definition = json.loads((INFRA / "roles" / "aml-quota-reader.json").read_text())
    from batchctl.doctor.deployment import QUOTA_ACTIONS

    assert definition["Actions"] == list(QUOTA_ACTIONS)
    assert definition["NotActions"] == definition["DataActions"] == []
    assert definition["AssignableScopes"] == ["/subscriptions/{subscriptionId}"]
    script = (INFRA / "hooks" / "create-quota-role.sh").read_text()
    assert "infra/roles/aml-quota-reader.json" in script
    assert "azd env set AML_QUOTA_READER_ROLE_ID" in script
    parameters = json.loads((INFRA / "main.parameters.json").read_text())["parameters"]
    assert parameters["amlQuotaReaderRoleId"]["value"] == "${AML_QUOTA_READER_ROLE_ID=}"
