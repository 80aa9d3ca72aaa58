"""Bad input at the edge: every flag's value checked while the arguments are parsed.

Each ``*_argument`` function (or factory) is an argparse ``type=``: it returns the value or
raises ``argparse.ArgumentTypeError`` with the rule, which argparse turns into a call of the
parser's ``error()`` (batchctl.cli makes that one line and exit 3). Checks that need more
than one flag, or that happen later in a handler, raise :class:`BadInputError` with the
flag's name; batchctl.cli reports both the same way. Numeric rules are read from the pydantic
models that hold them later (``RunOptions``, ``ControllerSettings``), so a flag and its field
can never disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel, ValidationError

from batchctl.contracts import RUN_ID_MAX_LENGTH, RUN_ID_PATTERN, ErrorBudget, FrameSize
from batchctl.planning import parse_duration
from batchctl.validation import problems
from batchctl.workspec import parse_model, parse_task

EXIT_BAD_INPUT = 3
# The longest duration a flag takes: a deadline beyond this is a typo, and much larger
# values overflow the datetime arithmetic the orchestrator does with it.
MAX_DURATION_S = 30 * 24 * 3600.0
# The largest sleep between looks a follower makes (time.sleep overflows on huge values).
MAX_INTERVAL_S = 3600.0


class BadInputError(Exception):
    """Input refused before anything started: the message states the rule, ``flag`` names
    the flag (or None when no single flag is to blame)."""

    def __init__(self, message: str, flag: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.flag = flag


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written (they hold examples), and every flag's default in its help.

    The default is left out where it says nothing (None, False) or the help already names
    it (``default: $BATCHCTL_APP_URL``).
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower():
            return text
        if action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def report_bad_input(
    command: str, message: str, *, flag: str | None, as_json: bool, code: int = EXIT_BAD_INPUT
) -> int:
    """One line on stderr (and one JSON line on stdout with --json); returns the exit code."""
    line = " ".join(message.split())  # one line, whatever the message held
    where = f"{flag}: " if flag and flag not in line else ""
    print(f"{command}: {where}{line}", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": line, "flag": flag, "exit_code": code}))
    return code


# -- numbers, with the rules of the model fields they end up in -------------------------------
def _field_bounds(model: type[BaseModel], name: str) -> dict[str, float]:
    bounds: dict[str, float] = {}
    for item in model.model_fields[name].metadata:
        for key in ("ge", "gt", "le", "lt"):
            if isinstance(item, getattr(annotated_types, key.capitalize())):
                bounds[key] = getattr(item, key)
    return bounds


def _rule(whole: bool, bounds: dict[str, float]) -> str:
    kind = "a whole number" if whole else "a number"
    low = bounds.get("ge", bounds.get("gt"))
    high = bounds.get("le", bounds.get("lt"))
    if whole and "ge" in bounds and "le" in bounds:
        return f"{kind} from {bounds['ge']:g} to {bounds['le']:g}"
    parts = []
    if low is not None:
        parts.append(f"{'>=' if 'ge' in bounds else '>'} {low:g}")
    if high is not None:
        parts.append(f"{'<=' if 'le' in bounds else '<'} {high:g}")
    return f"{kind} {' and '.join(parts)}" if parts else kind


def number_argument(
    *, whole: bool, ge: float | None = None, gt: float | None = None, le: float | None = None,
    lt: float | None = None,
) -> Callable[[str], Any]:  # fmt: skip
    """A type= for a finite int or float within the given bounds."""
    bounds = {
        key: value
        for key, value in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt))
        if value is not None
    }
    rule = _rule(whole, bounds)

    def convert(text: str) -> Any:
        try:
            value: float = int(text) if whole else float(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
        # A whole number is always finite (and may be too large for a float to hold).
        if not whole and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        if (
            ("ge" in bounds and value < bounds["ge"])
            or ("gt" in bounds and value <= bounds["gt"])
            or ("le" in bounds and value > bounds["le"])
            or ("lt" in bounds and value >= bounds["lt"])
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not {rule}")
        return value

    convert.__name__ = rule  # argparse names the type in some messages
    return convert


def field_argument(model: type[BaseModel], name: str) -> Callable[[str], Any]:
    """A type= for a numeric field of ``model``, with that field's own bounds."""
    annotation = model.model_fields[name].annotation
    whole = annotation is int
    return number_argument(whole=whole, **_field_bounds(model, name))


# -- durations, ids, names --------------------------------------------------------------------
def duration_argument(*, allow_zero: bool = False) -> Callable[[str], float]:
    """A type= for a duration like 90s, 5m, 2h, 1h30m (at most 30 days)."""

    def convert(text: str) -> float:
        try:
            seconds = parse_duration(text)
        except (ValueError, OverflowError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        if not math.isfinite(seconds) or seconds > MAX_DURATION_S:
            raise argparse.ArgumentTypeError(f"{text!r} is longer than 30 days")
        if seconds < 0 or (seconds == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text!r} must be {'>= 0' if allow_zero else '> 0'}")
        return seconds

    convert.__name__ = "duration"
    return convert


def run_id_argument(text: str) -> str:
    """A run id as the app makes them; anything else is refused before it reaches a URL."""
    if len(text) > RUN_ID_MAX_LENGTH or not re.fullmatch(RUN_ID_PATTERN, text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a run id: lower-case letters and digits in groups joined by "
            f"single hyphens, at most {RUN_ID_MAX_LENGTH} characters "
            "(like run-20250101-120000-abc123)"
        )
    return text


def frame_size_argument(text: str) -> str:
    """224 or WIDTHxHEIGHT, each side 16..4096 (the run's FrameSize rule)."""
    _validate_model(FrameSize, text)
    return text


def error_budget_argument(text: str) -> str:
    """A count like 10 or a percentage like 2.5% (the run's ErrorBudget rule)."""
    _validate_model(ErrorBudget, text)
    return text


def _validate_model(model: type[BaseModel], text: str) -> None:
    try:
        model.model_validate(text)
    except ValidationError as error:
        # The flag names the field already: only the first problem's message.
        problem = problems(error)[0]["error"]
        raise argparse.ArgumentTypeError(problem) from None


def vm_size_argument(text: str) -> str:
    """An Azure VM size name (letters, digits, underscores)."""
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]{0,63}", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a VM size name like Standard_NC4as_T4_v3"
        )
    return text


def path_argument(text: str) -> Path:
    """A file system path: not empty, no NUL (which no file system takes)."""
    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not a usable path")
    return Path(text)


def _is_file(path: Path) -> bool:
    # A name the file system refuses (too long, say) raises instead of answering False.
    try:
        return path.is_file()
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def existing_file_argument(text: str) -> Path:
    path = path_argument(text)
    if not _is_file(path):
        raise argparse.ArgumentTypeError(f"{text} not found (or not a file)")
    return path


def existing_dir_argument(text: str) -> Path:
    path = path_argument(text)
    if not _is_dir(path):
        raise argparse.ArgumentTypeError(f"{text} is not a directory")
    return path


def code_folder_argument(text: str) -> str:
    """A --code folder on this machine (packed and uploaded by the client), as text."""
    return str(existing_dir_argument(text))


def manifest_argument(text: str) -> Path:
    """A readable manifest CSV whose header names a video column (read here, once)."""
    path = existing_file_argument(text)
    problem = manifest_header_problem(path)
    if problem:
        raise argparse.ArgumentTypeError(f"{text}: {problem}")
    return path


def manifest_header_problem(path: Path) -> str | None:
    """Why the manifest cannot run as a whole (its header), or None when the header is fine.

    The same reader the run uses: only the header is read here; bad rows are the run's to
    report by row number.
    """
    from batchctl.manifest import (
        ManifestFatalError,
        SourcePolicy,
        iter_lines,
        read_file_chunks,
        read_manifest,
    )

    try:
        read_manifest(iter_lines(read_file_chunks(path)), SourcePolicy(local_root=path.parent))
    except ManifestFatalError as error:
        return str(error)
    except (OSError, UnicodeError) as error:
        return f"cannot be read: {error}"
    return None


def http_url_argument(text: str) -> str:
    """An http(s) URL with a host (a storage account's blob endpoint)."""
    parsed = urllib.parse.urlsplit(text.strip())
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an http(s) URL like https://ACCOUNT.blob.core.windows.net"
        )
    return text.strip()


def app_url_argument(text: str) -> str:
    """A Function App URL as the client takes it (https, or http to this machine)."""
    from batchctl.client import AppError, normalize_app_url

    try:
        normalize_app_url(text)
    except (AppError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def blob_name_argument(text: str) -> str:
    """A manifest blob name as the app's start route takes it (1..2048 characters)."""
    if not text.strip() or len(text) > 2048:
        raise argparse.ArgumentTypeError("must be 1 to 2048 characters")
    return text


# -- the work: model and task -----------------------------------------------------------------
def model_argument(text: str) -> str:
    """A model the worker knows by name (its files are checked where they must exist)."""
    try:
        parse_model(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def local_model_argument(text: str) -> str:
    """A model for a run on this machine: a known name, and its files exist here."""
    model_argument(text)
    try:
        check_local_model(text)
    except BadInputError as error:
        raise argparse.ArgumentTypeError(error.message) from None
    return text


def check_local_model(text: str) -> None:
    from batchctl.artifacts import parse_ref

    spec = parse_model(text)
    for what, name in (("model file", spec.name if spec.kind == "file" else None),
                       ("weights file", spec.weights)):  # fmt: skip
        # A reference (a retry's parent uploaded it) is checked against storage at upload.
        if name is not None and parse_ref(name) is None and not _is_file(Path(name)):
            raise BadInputError(f"{what} {name} does not exist", "--model")


def task_argument(text: str) -> str:
    """A built-in task or the syntax of 'module:Class' (it is imported where it runs)."""
    try:
        parse_task(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


@contextlib.contextmanager
def _worker_import_path(code: str | None = None) -> Iterator[None]:
    # Local workers run with the repository root and node_image/ on PYTHONPATH
    # (batchctl.compute.local), and a run's --code folder before them (node_image's
    # ownwork.py); a task module is looked up the same way here. Modules imported from the
    # code folder are forgotten afterwards: they are the run's, not this process's.
    from batchctl.compute.local import REPO_ROOT, WORKER_PACKAGE_DIR

    saved = list(sys.path)
    before = set(sys.modules)
    sys.path[:0] = [*([str(Path(code).resolve())] if code else []), str(WORKER_PACKAGE_DIR),
                    str(REPO_ROOT)]  # fmt: skip
    try:
        yield
    finally:
        sys.path[:] = saved
        if code:
            folder = str(Path(code).resolve())
            for name in set(sys.modules) - before:
                origin = getattr(sys.modules[name], "__file__", None) or ""
                if origin.startswith(folder):
                    del sys.modules[name]


def check_local_task(text: str, code: str | None = None) -> None:
    """BadInputError unless the task is built in or its class imports with the methods a
    task needs (the worker's own check, done once here instead of on every item); with
    ``code`` (a --code folder), the folder comes first on the path, as on the nodes."""
    parsed = parse_task(text)
    if parsed is None:
        return
    module_name, class_name = parsed
    import importlib

    with _worker_import_path(code):
        try:
            module = importlib.import_module(module_name)
        except Exception as error:  # an import can fail any way its module likes
            cause = " ".join(str(error).split()) or type(error).__name__
            raise BadInputError(
                f"task module {module_name!r} cannot be imported: {cause}", "--task"
            ) from None
    found = getattr(module, class_name, None)
    if not isinstance(found, type):
        raise BadInputError(f"task {text!r}: {module_name} has no class {class_name}", "--task")
    missing = [
        name for name in ("setup", "process", "close") if not callable(getattr(found, name, None))
    ]
    if missing:
        raise BadInputError(
            f"task {text!r} lacks {', '.join(missing)} (a task has setup, process, close)",
            "--task",
        )
