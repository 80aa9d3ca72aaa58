"""`batchctl doctor [--app URL] [--probe]`: what a first run needs, checked before it costs.

Without ``--app`` it checks this machine for a local run: the Python modules, ffmpeg and
ffprobe (versions, an H.264 encode, the protocol whitelist the worker relies on), Node and
Azurite from the lock file, free disk in the temp dir, where the default model's weights come
from (or that it runs with random weights), then a probe: a real 1-item ``batchctl run`` of a
generated 1 s video (``--no-probe`` leaves it out).

With ``--app URL`` (or BATCHCTL_APP_URL, or the azd environment of this folder) it checks
the deployment instead: resource providers, the low-priority quota for ``--vm-size`` in the
region (through the AML backend's quota path), the workspace and its identity, the role
assignments of the app's and the nodes' identities, the node image in the registry (the tag
from the app's settings), the Event Grid subscription on the manifests container, and that
the app answers GET /api/runs with the key (BATCHCTL_FUNCTION_KEY, never printed). ``--probe``
adds a 1-item run on a 1-node cluster (it starts a node, so it is not the default).
``--image REF`` (what ``submit --image`` would start the run's nodes on) adds a check that the
image exists and that the nodes may pull it: in the deployment's registry through the compute
identity's AcrPull, in another Azure Container Registry through a pull role there, or, for a
public image, anonymously.

``--deployer`` checks, before `azd up`, that the signed-in account may deploy here: its
permissions on the subscription (AZURE_SUBSCRIPTION_ID, or the azd environment) against what
the deployment and its hooks ask of Azure (batchctl.doctor.deployer; the azd preprovision hook
runs the same check).

Each check prints one line: ``ok``, ``FAIL ...: what to do``, or ``skip ...: why``.
``--json`` ends with one JSON line (``checks``: status, what, detail; ``exit_code``).
Exit codes: 0 nothing failed, 1 a check failed, 3 bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from batchctl.commands.validate import BadInputError, app_url_argument, vm_size_argument
from batchctl.contracts import RunOptions
from batchctl.doctor.deployment import Deployment, DeploymentReader
from batchctl.doctor.report import CheckResult, exit_code, fail

_DEFAULTS = RunOptions()


def azure_reader(deployment: Deployment, key: str | None) -> DeploymentReader:
    """The real reader (the only part of the doctor that talks to Azure)."""
    from batchctl.doctor.azure_reader import AzureDeploymentReader

    return AzureDeploymentReader(deployment, key=key)


# The adapter boundary: tests put a fake reader here; everything above it runs for real.
make_reader: Callable[[Deployment, str | None], DeploymentReader] = azure_reader


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="check this machine (or, with --app, a deployment) before a first run",
        description=__doc__,
    )
    parser.add_argument(
        "--app",
        type=app_url_argument,
        help="check this deployed Function App, https (default: $BATCHCTL_APP_URL, then the "
        "azd environment; without any, this machine is checked)",
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="check this machine even when an app URL is configured",
    )
    parser.add_argument(
        "--vm-size",
        type=vm_size_argument,
        default=_DEFAULTS.vm_size,
        help="the VM size whose quota is checked (with --app)",
    )
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument(
        "--low-priority",
        dest="low_priority",
        action="store_true",
        default=_DEFAULTS.low_priority,
        help="check low-priority quota (the default)",
    )
    tier.add_argument(
        "--dedicated", dest="low_priority", action="store_false", help="check dedicated quota"
    )
    probe = parser.add_mutually_exclusive_group()
    probe.add_argument(
        "--probe",
        action="store_true",
        help="with --app: also run 1 item on a 1-node cluster (starts a node)",
    )
    probe.add_argument(
        "--no-probe", action="store_true", help="locally: leave out the 1-item local run"
    )
    parser.add_argument(
        "--image",
        type=image_argument,
        metavar="REF",
        help="with --app: also check that this image (as `submit --image` takes it) exists "
        "and that the run's nodes may pull it",
    )
    parser.add_argument(
        "--deployer",
        action="store_true",
        help="check that your account may run `azd up` on the subscription (before deploying)",
    )
    parser.add_argument("--json", action="store_true", help="end with one JSON line on stdout")
    parser.set_defaults(handler=handle)


def image_argument(text: str) -> str:
    """An image reference, by the rule of ``RunOptions.image`` (the one ``submit --image``
    applies), so doctor accepts exactly what a run would."""
    try:
        RunOptions(image=text)
    except ValidationError as error:
        # The field's message alone: argparse already names the flag.
        raise argparse.ArgumentTypeError(error.errors()[0]["msg"]) from None
    return text


def run_checks(
    checks: Sequence[Callable[[], list[CheckResult]]], *, echo: Callable[[str], None]
) -> list[CheckResult]:
    """Each check in turn, its line printed as soon as it is known; a check that raises is a
    FAIL naming the error (a bug in one check must not hide the others' answers)."""
    results: list[CheckResult] = []
    for check in checks:
        try:
            produced = check()
        except Exception as error:  # any SDK or OS error: reported, the next check runs
            name = getattr(check, "__name__", "check")
            produced = [fail(name, f"{type(error).__name__}: {error}")]
        for result in produced:
            echo(result.line())
            results.append(result)
    return results


def handle(args: argparse.Namespace) -> int:
    from batchctl.client import FUNCTION_KEY_ENV, resolve_app_url

    # With --json the lines go to stderr, so stdout holds the one JSON line only.
    out = sys.stderr if args.json else sys.stdout

    def echo(line: str) -> None:
        print(line, file=out, flush=True)

    app = None if args.local or args.deployer else resolve_app_url(args.app)
    if args.deployer:
        echo("batchctl doctor: may this account deploy batchctl (azd up)?")
        checks = deployer_checks()
    elif app is not None and app.value:
        echo(f"batchctl doctor: deployment at {app.value} (from {app.source})")
        checks = deployment_checks(args, app.value, key=os.environ.get(FUNCTION_KEY_ENV))
    else:
        if args.image is not None:
            # A local run has no image (its nodes are this machine's processes): checking one
            # here would pass or fail for nothing a run uses.
            raise BadInputError(
                "checks the image of a deployment's run: give --app URL (or configure one)",
                "--image",
            )
        echo("batchctl doctor: this machine (pass --app URL to check a deployment)")
        checks = local_checks(args)
    results = run_checks(checks, echo=echo)
    code = exit_code(results)
    if args.json:
        print(json.dumps({"checks": [r.as_json() for r in results], "exit_code": code}))
    return code


def local_checks(args: argparse.Namespace) -> list[Callable[[], list[CheckResult]]]:
    from batchctl.doctor.local import local_checks as checks_of

    # A folder of its own for the probe's files, gone when the process ends.
    workdir = Path(tempfile.mkdtemp(prefix="batchctl-doctor-"))
    import atexit
    import shutil

    atexit.register(shutil.rmtree, workdir, True)
    return [_one(check) for check in checks_of(workdir, probe=not args.no_probe)]


def _one(check: Callable[[], CheckResult]) -> Callable[[], list[CheckResult]]:
    def run() -> list[CheckResult]:
        return [check()]

    run.__name__ = getattr(check, "__name__", "check")
    return run


def _deployment(app_url: str | None) -> Deployment:
    from batchctl.azdenv import load_azd_environment

    found = load_azd_environment()
    # The shell's AZURE_* values win over the file's, as BATCHCTL_* ones do for the client.
    values = {**(found.values if found else {}), **os.environ}
    source = f"{found.path} and the environment" if found else "the environment (no azd file)"
    return Deployment.from_values(values, app_url=app_url, source=source)


def deployer_checks() -> list[Callable[[], list[CheckResult]]]:
    from batchctl.doctor.deployment import check_deployer

    deployment = _deployment(None)
    reader = make_reader(deployment, None)
    return [lambda: [check_deployer(reader, deployment)]]


def deployment_checks(
    args: argparse.Namespace, app_url: str, *, key: str | None
) -> list[Callable[[], list[CheckResult]]]:
    from batchctl.doctor import deployment as checks

    deployment = _deployment(app_url)
    reader = make_reader(deployment, key)
    return checks.deployment_checks(
        reader,
        deployment,
        vm_size=args.vm_size,
        low_priority=args.low_priority,
        has_key=bool(key),
        probe=args.probe,
        image=args.image,
    )
