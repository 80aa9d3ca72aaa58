"""`batchctl ...`: one entry point; each subcommand lives in batchctl/commands/<name>.py.

A command module exposes ``register(subparsers)``, which adds its parser and sets
``handler`` (a function taking the parsed namespace and returning the exit code).

Bad input never shows a traceback: a flag whose value breaks its rule, an argparse usage
error, a ``BadInputError`` from a handler and storage that cannot be reached are each one
line on stderr (and, with ``--json``, one JSON line on stdout) and exit 3.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import importlib.metadata
import json
import os
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any, NoReturn

from batchctl.commands.validate import (
    BadInputError,
    HelpFormatter,
    report_bad_input,
)

# Order is the order shown in --help.
COMMAND_MODULES: tuple[str, ...] = (
    "run",
    "resume",
    "retry",
    "trial",
    "watch",
    "serve",
    "demo",
    "plan",
    "submit",
    "status",
    "cancel",
    "report",
    "dashboard",
    "doctor",
    "task",
)
DISTRIBUTION = "batchctl"
EXIT_INTERRUPTED = 130
STORAGE_URL_VARIABLES = ("BATCHCTL_BLOB_URL", "BATCHCTL_QUEUE_URL", "BATCHCTL_TABLE_URL")


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are BadInputError (exit 3, one line), not exit 2.

    argparse gives subparsers the class of their parent, so every command's parser is one.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        flag, rule = _flag_and_rule(message)
        raise BadInputError(rule, flag)


def _flag_and_rule(message: str) -> tuple[str | None, str]:
    """The flag an argparse message is about, and the message worded around that flag."""
    about = re.match(r"argument (\S+?): (.*)", message, re.DOTALL)
    if about:
        # "-n/--nodes" -> "--nodes": the long spelling is the one people search for.
        flag = max(about.group(1).split("/"), key=len)
        return flag, f"{flag}: {about.group(2)}"
    unknown = re.match(r"unrecognized arguments: (.*)", message, re.DOTALL)
    if unknown:
        # Only the flags: a value typed after a wrong flag may be a secret (a key, a token).
        tokens = unknown.group(1).split()
        flags = [token for token in tokens if token.startswith("-")]
        values = len(tokens) - len(flags)
        shown = " ".join(flags) + (f" (and {values} value{'s' * (values > 1)})" if values else "")
        return (flags or [None])[0], f"unrecognized arguments: {shown.strip()}"
    listed = re.match(
        r"(?:the following arguments are required|"
        r"one of the arguments|ambiguous option):? (\S+)",
        message,
    )
    if listed:
        return listed.group(1).rstrip(","), message
    return None, message


def package_version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed as a distribution)"


def build_parser() -> argparse.ArgumentParser:
    parser = CliParser(
        prog="batchctl",
        description="Run one piece of work over many videos on a fleet of GPU nodes.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"batchctl {package_version()}",
        help="print the installed version and exit",
    )
    subparsers = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", help="one of these; COMMAND --help"
    )
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"batchctl.commands.{name}")
        module.register(subparsers)
    return parser


def _wants_json(argv: Sequence[str]) -> bool:
    # Known before parsing succeeds, so a usage error can answer in JSON as well.
    tokens = list(argv)
    if "--" in tokens:
        tokens = tokens[: tokens.index("--")]
    return "--json" in tokens


def _command_of(argv: Sequence[str]) -> str:
    first = next((token for token in argv if not token.startswith("-")), None)
    return f"batchctl {first}" if first in COMMAND_MODULES else "batchctl"


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(arguments)
    command = _command_of(arguments)
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except BadInputError as error:
        return report_bad_input(command, error.message, flag=error.flag, as_json=as_json)
    except SystemExit as exit_:
        # --help and --version end parsing on purpose; their code is argparse's (0).
        return exit_.code if isinstance(exit_.code, int) else 0
    as_json = bool(getattr(args, "json", as_json))
    try:
        code: int = args.handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BadInputError as error:
        return report_bad_input(command, error.message, flag=error.flag, as_json=as_json)
    except Exception as error:
        return report_failure(command, error, as_json=as_json)
    return code


def entry() -> NoReturn:
    """The ``batchctl`` command (and ``python -m batchctl``): :func:`main`, then a quick exit.

    A finished command has nothing left for the interpreter's own teardown to do but free
    every module's objects one by one (pydantic's schemas, matplotlib, the Azure SDKs): about
    0.2 s after the last line a user waits for. So the exit hooks run (logging's flush
    included), both streams are flushed and the process ends at once. Only when the main
    thread is the last one: a thread still running is the interpreter's to wait for.
    """
    code = main()
    if threading.active_count() > 1:
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def report_failure(command: str, error: Exception, *, as_json: bool) -> int:
    """Bad input met while running a command (exit 3), or a local run whose orchestration
    ended without a report or whose results could not be copied out (exit 2; the results
    stay in storage): one line each, not a traceback. Anything else is a bug and raised
    again: its traceback is what fixes it."""
    from batchctl.controller import RunCopyError
    from batchctl.local.session import EXIT_RUN_FAILED, LocalRunError

    if isinstance(error, LocalRunError | RunCopyError):
        print(f"{command}: {error}", file=sys.stderr)
        if as_json:
            print(json.dumps({"error": str(error)}))
        return EXIT_RUN_FAILED
    refusal = bad_input_of(error)
    if refusal is None:
        raise error
    return report_bad_input(command, refusal[0], flag=refusal[1], as_json=as_json)


def bad_input_of(error: BaseException) -> tuple[str, str | None] | None:
    """(message, flag) when ``error`` is bad input met while running a command: storage
    that cannot be reached, a run id another run holds; None for anything else."""
    from batchctl.artifacts import ArtifactError
    from batchctl.controller import RunIdTakenError
    from batchctl.local.runfolder import RunFolderError

    if isinstance(error, RunIdTakenError):
        return str(error), "--run-id"
    if isinstance(error, RunFolderError | ArtifactError):
        return str(error), None
    unreachable = storage_unreachable(error)
    return (unreachable, None) if unreachable is not None else None


def storage_unreachable(error: BaseException) -> str | None:
    """'cannot reach storage at URL: cause' when ``error`` (or what caused it) is a storage
    connection failure; None for anything else."""
    from azure.core.exceptions import ServiceRequestError, ServiceResponseError

    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, ServiceRequestError | ServiceResponseError):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return None
    text = " ".join(str(seen).split())
    errno_cause = re.search(r"\[Errno -?\d+\] ([^'\"]+)", text)
    cause = errno_cause.group(1).strip() if errno_cause else text.rsplit(": ", 1)[-1]
    return f"cannot reach storage at {_storage_url_in(text)}: {cause or type(seen).__name__}"


def _storage_url_in(text: str) -> str:
    """The configured storage URL the SDK's message is about (it names only host and port)."""
    urls = [os.environ[name] for name in STORAGE_URL_VARIABLES if os.environ.get(name)]
    host = re.search(r"host='([^']*)', port=(\d+)", text)
    if host:
        for url in urls:
            if f"//{host.group(1)}:{host.group(2)}" in url or (
                f"//{host.group(1)}/" in url + "/" and host.group(2) in ("80", "443")
            ):
                return url
        return f"{host.group(1)}:{host.group(2)}"
    return urls[0] if urls else "the configured storage"


if __name__ == "__main__":
    raise SystemExit(main())
