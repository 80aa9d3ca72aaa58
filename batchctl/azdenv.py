"""The deployment's values as ``azd`` keeps them, so the client needs no exports after ``azd up``.

azd writes each environment's values (infra/main.bicep outputs, plus its own
``AZURE_ENV_NAME``, ``AZURE_LOCATION``, ``AZURE_SUBSCRIPTION_ID``) to
``<project>/.azure/<env>/.env``; ``<project>`` is the folder holding ``azure.yaml`` (azd looks
for it from the current folder upwards, and so does this module). The environment is
``AZURE_ENV_NAME`` when set (azd's own default for ``-e``), else ``defaultEnvironment`` in
``<project>/.azure/config.json``. The file is what godotenv's Marshal writes: ``KEY="value"``
with ``\\``, ``"``, ``!``, ``$`` and backquote escaped by a backslash and newlines as ``\\n``
(integers unquoted); ``azd env get-values`` prints the same lines.

Precedence, everywhere the client reads a value: the command-line flag, then the
``BATCHCTL_*`` variable, then the azd environment file. Nothing secret is ever in that file
(the deployment has no keys); the function key still comes only from BATCHCTL_FUNCTION_KEY.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "APP_URL_KEYS",
    "BLOB_URL_KEYS",
    "AzdEnvironment",
    "Resolved",
    "find_project_root",
    "load_azd_environment",
    "parse_dotenv",
    "resolve",
]

PROJECT_FILE = "azure.yaml"
AZD_DIR = ".azure"
ENV_FILE = ".env"
CONFIG_FILE = "config.json"
ENV_NAME_VARIABLE = "AZURE_ENV_NAME"

# The azd values that stand in for a BATCHCTL_* variable, best first: infra/main.bicep outputs
# the BATCHCTL_ names itself; environments provisioned before it did have only the AZURE_ ones.
APP_URL_KEYS = ("BATCHCTL_APP_URL", "AZURE_FUNCTION_APP_URL")
BLOB_URL_KEYS = ("BATCHCTL_BLOB_URL", "AZURE_STORAGE_BLOB_ENDPOINT")

_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_.]*)\s*=\s*(.*?)\s*$")
# godotenv unescapes these after a backslash inside double quotes (its doubleQuoteSpecialChars).
_DOUBLE_QUOTED_ESCAPES = {"n": "\n", "r": "\r", "\\": "\\", '"': '"', "!": "!", "$": "$", "`": "`"}


def parse_dotenv(text: str) -> dict[str, str]:
    """``KEY=value`` lines as azd writes them (and as people edit them) into a dict.

    Blank lines and ``#`` comments are skipped, an ``export`` prefix is allowed; a value is
    double-quoted (escapes as above), single-quoted (literal) or bare (up to a `` #``
    comment). A later line for the same key wins, as in godotenv.
    """
    values: dict[str, str] = {}
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        line = lines[index]
        index += 1
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            continue  # not an assignment: godotenv skips such lines too
        key, raw = match.groups()
        if raw.startswith('"'):
            # A double-quoted value may span lines (a literal newline inside the quotes).
            body = raw[1:]
            while _closing_quote(body, '"') is None and index < len(lines):
                body += "\n" + lines[index]
                index += 1
            end = _closing_quote(body, '"')
            values[key] = _unescape(body[:end] if end is not None else body)
        elif raw.startswith("'"):
            end = raw.find("'", 1)
            values[key] = raw[1:end] if end > 0 else raw[1:]
        else:
            values[key] = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
    return values


def _closing_quote(body: str, quote: str) -> int | None:
    escaped = False
    for position, char in enumerate(body):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == quote:
            return position
    return None


def _unescape(body: str) -> str:
    return re.sub(
        r"\\(.)", lambda m: _DOUBLE_QUOTED_ESCAPES.get(m.group(1), "\\" + m.group(1)), body
    )


def find_project_root(start: Path | None = None) -> Path | None:
    """The nearest folder at or above ``start`` (default: the current one) with azure.yaml."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / PROJECT_FILE).is_file():
            return folder
    return None


@dataclass(frozen=True)
class AzdEnvironment:
    """One azd environment's values and the file they were read from."""

    name: str
    path: Path
    values: Mapping[str, str]

    def get(self, *keys: str) -> str | None:
        """The first of ``keys`` that has a non-empty value."""
        for key in keys:
            value = self.values.get(key)
            if value:
                return value
        return None


def _environment_name(root: Path, environ: Mapping[str, str]) -> str | None:
    named = environ.get(ENV_NAME_VARIABLE)
    if named:
        return named
    try:
        config = json.loads((root / AZD_DIR / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("defaultEnvironment") if isinstance(config, dict) else None
    return name if isinstance(name, str) and name else None


def load_azd_environment(
    start: Path | None = None, environ: Mapping[str, str] | None = None
) -> AzdEnvironment | None:
    """The selected azd environment of the project at or above ``start``; None without one.

    None, never an error, when there is no project, no environment selected or no file: the
    client then asks for the flag or the variable as before. A name that would leave
    ``.azure/`` (a path separator, ``..``) selects nothing.
    """
    environ = os.environ if environ is None else environ
    root = find_project_root(start)
    if root is None:
        return None
    name = _environment_name(root, environ)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        return None
    path = root / AZD_DIR / name / ENV_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeError):
        return None
    return AzdEnvironment(name=name, path=path, values=parse_dotenv(text))


@dataclass(frozen=True)
class Resolved:
    """A value and where it came from (``--app``, ``$BATCHCTL_APP_URL``, the azd file...)."""

    value: str | None
    source: str | None


def resolve(
    flag_value: str | None,
    flag: str,
    variable: str,
    azd_keys: tuple[str, ...],
    *,
    environ: Mapping[str, str] | None = None,
    azd: AzdEnvironment | None = None,
    start: Path | None = None,
) -> Resolved:
    """Flag, then environment variable, then the azd environment file (read only if needed)."""
    if flag_value:
        return Resolved(flag_value, flag)
    environ = os.environ if environ is None else environ
    if environ.get(variable):
        return Resolved(environ[variable], f"${variable}")
    found = azd if azd is not None else load_azd_environment(start, environ)
    if found is not None:
        for key in azd_keys:
            value = found.values.get(key)
            if value:
                return Resolved(value, f"{key} in {found.path}")
    return Resolved(None, None)
