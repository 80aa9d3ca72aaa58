"""Which video sources may be named and read: the rules written once, for both sides.

Sources are untrusted input (DESIGN.md, invariant 7). The controller checks every manifest
row against the run's allowlist (:func:`normalize_source` with the controller's
:class:`SourcePolicy`); a worker checks every item again before it fetches anything
(:func:`locate_blob` with :func:`worker_policy`), because a queue message is only as
trustworthy as whoever could write to the queue. Both go through the same canonical form:

- a URL must be https (or http to a loopback host, which is where Azurite listens), under an
  allowed prefix, with no credentials, query (no SAS tokens), fragment, dot segments or
  encoded slashes, and name a blob (a container and a name), never a bare container;
- a local path is allowed only in local mode (a ``local_root``) and only under that root,
  with symlinks resolved.

Nothing here does I/O beyond resolving a local path; the storage adapter
(:mod:`batchctl.storage.items`) fetches what these functions allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# Characters a path segment may carry unescaped (RFC 3986 pchar minus the always-safe ones
# that quote() keeps anyway). Everything else is percent-encoded on normalization.
_PCHAR_SAFE = "!$&'()*+,;=:@"
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_.~!$&'()*+,;=:@-]+")
_ACCOUNT = re.compile(r"[a-z0-9]{3,24}")
_CONTAINER = re.compile(r"[a-z0-9](?:[a-z0-9]|-(?=[a-z0-9])){2,62}")
_DEFAULT_PORTS = {"https": 443, "http": 80}
# Any Azure storage account's blob endpoint over https, default port (canonical form).
_AZURE_BLOB_ACCOUNT = re.compile(r"^https://[a-z0-9]{3,24}\.blob\.core\.windows\.net/")


class SourceRejectedError(ValueError):
    """A video source broke a rule; the message names the rule."""


@dataclass(frozen=True)
class SourcePolicy:
    """Which video sources may be named (a manifest) or read (a worker).

    ``allowed_prefixes`` are URL prefixes (normalized on construction: lower-case scheme and
    host, default port dropped, trailing slash added). ``local_root`` enables local paths
    (local mode only): they must resolve, symlinks followed, to an existing file under it.
    ``any_azure_account`` also allows a blob in any Azure storage account over https: a
    worker with managed identity reads what its identity was granted, and which accounts a
    run may name was the controller's allowlist's decision, not the worker's.
    """

    allowed_prefixes: tuple[str, ...] = ()
    local_root: Path | None = None
    any_azure_account: bool = False

    def __post_init__(self) -> None:
        # Frozen: normalize through object.__setattr__ once, so every comparison later is a
        # plain startswith on canonical strings.
        prefixes = tuple(_normalize_prefix(prefix) for prefix in self.allowed_prefixes)
        object.__setattr__(self, "allowed_prefixes", prefixes)
        if self.local_root is not None:
            object.__setattr__(self, "local_root", Path(self.local_root).resolve())


def prefixes_from_accounts(
    entries: Iterable[str], *, endpoint_suffix: str = "core.windows.net"
) -> tuple[str, ...]:
    """Turn ``"account/container"`` and ``"account/*"`` entries into blob URL prefixes.

    ``"acct/media"`` allows ``https://acct.blob.core.windows.net/media/...``; ``"acct/*"``
    allows any container of that account. An entry that already is an http(s) URL prefix
    (such as Azurite's ``http://127.0.0.1:10000/devstoreaccount1/media/``) is kept as is.
    """
    prefixes: list[str] = []
    for entry in entries:
        text = entry.strip()
        if text.lower().startswith(("https://", "http://")):
            prefixes.append(_normalize_prefix(text))
            continue
        account, slash, container = text.partition("/")
        if not slash or not _ACCOUNT.fullmatch(account):
            raise ValueError(
                f"allowed source {entry!r} is not 'account/container' or 'account/*' "
                "(account names are 3-24 lower-case letters and digits)"
            )
        if container != "*" and not _CONTAINER.fullmatch(container):
            raise ValueError(f"allowed source {entry!r}: {container!r} is not a container name")
        base = f"https://{account}.blob.{endpoint_suffix}/"
        prefixes.append(base if container == "*" else f"{base}{container}/")
    return tuple(prefixes)


def normalize_source(value: str, policy: SourcePolicy) -> str:
    """The canonical form of a video source, or SourceRejectedError naming the broken rule.

    URLs come back as normalized URL strings; local paths as ``file://`` + the absolute,
    symlink-resolved path.
    """
    if "\\" in value:
        raise SourceRejectedError("backslashes are not allowed in a source")
    if _CONTROL.search(value):
        raise SourceRejectedError("control characters are not allowed in a source")
    if value.startswith("//"):
        raise SourceRejectedError("scheme-relative URLs ('//host/...') are not allowed")
    if _SCHEME.match(value):
        return _normalize_url(value, policy)
    return _normalize_local_path(value, policy.local_root)


def local_path_of(source: str) -> Path | None:
    """The local file a normalized ``file://`` source names, or None for a URL source."""
    return Path(source.removeprefix("file://")) if source.startswith("file://") else None


def local_file_version(stat: os.stat_result) -> str:
    """What tells this version of a local video from others (a source's ``source_version``:
    what --skip-existing compares): its size and modification time, from one ``stat``."""
    return f"size={stat.st_size};mtime_ns={stat.st_mtime_ns}"


def _normalize_url(value: str, policy: SourcePolicy) -> str:
    url = _canonical_url(value)
    prefixes = policy.allowed_prefixes
    if not prefixes and not policy.any_azure_account:
        raise SourceRejectedError("no storage account or container is allowed for URLs")
    if not url.startswith(prefixes) and not (
        policy.any_azure_account and _AZURE_BLOB_ACCOUNT.match(url)
    ):
        shown = ", ".join(prefixes[:3]) + (", ..." if len(prefixes) > 3 else "")
        raise SourceRejectedError(f"not under an allowed account/container ({shown})")
    # Two segments at least: a container and a blob name, never a bare container (which an
    # "account/*" prefix would otherwise let through).
    if url.split("/", 3)[3].count("/") < 1:
        raise SourceRejectedError("the URL names a container, not a blob")
    return url


def _canonical_url(value: str, *, allow_folder: bool = False) -> str:
    """Check the SSRF rules and rebuild the URL canonically (scheme, host, port, path)."""
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise SourceRejectedError(f"malformed URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise SourceRejectedError(
            f"scheme '{scheme}:' is not allowed: only https (or http to a loopback host)"
        )
    if "@" in parts.netloc:
        raise SourceRejectedError("credentials in a URL (user@host) are not allowed")
    host = parts.hostname
    if not host:
        raise SourceRejectedError("malformed URL: no host")
    if scheme == "http" and host not in LOOPBACK_HOSTS:
        raise SourceRejectedError(
            "http is only allowed to a loopback host (127.0.0.1, localhost); use https"
        )
    if parts.query:
        # A SAS token would travel on into queue messages and logs; nodes use their identity.
        raise SourceRejectedError("query strings (such as SAS tokens) are not allowed")
    if parts.fragment:
        raise SourceRejectedError("fragments ('#...') are not allowed")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc = f"{netloc}:{port}"
    return f"{scheme}://{netloc}{_canonical_path(parts.path, allow_folder=allow_folder)}"


def _canonical_path(path: str, *, allow_folder: bool) -> str:
    if not path or path == "/":
        if allow_folder:
            return "/"
        raise SourceRejectedError("the URL has no blob path")
    if _BAD_ESCAPE.search(path):
        raise SourceRejectedError("malformed percent-escape in the path")
    segments = path[1:].split("/")
    if segments[-1] == "":
        if not allow_folder:
            raise SourceRejectedError("the URL ends with '/': it names a folder, not a blob")
        segments.pop()
    canonical: list[str] = []
    for segment in segments:
        if _PLAIN_SEGMENT.fullmatch(segment) and segment not in {".", ".."}:
            canonical.append(segment)  # the common case: nothing to decode or re-encode
            continue
        if not segment:
            raise SourceRejectedError("empty path segments ('//') are not allowed")
        try:
            decoded = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            raise SourceRejectedError("percent-escapes in the path are not UTF-8") from None
        # Checked after decoding, so "%2e%2e" and "%2F" cannot smuggle a traversal past us.
        if decoded in {".", ".."}:
            raise SourceRejectedError("'.' and '..' path segments are not allowed")
        if "/" in decoded or "\\" in decoded:
            raise SourceRejectedError("encoded slashes (%2F, %5C) are not allowed in the path")
        if _CONTROL.search(decoded):
            raise SourceRejectedError("encoded control characters are not allowed in the path")
        # Decode-then-quote gives one spelling per blob name (%41 -> A, %c3%a9 -> %C3%A9,
        # a raw space -> %20), so the same video always gets the same source and id.
        canonical.append(quote(decoded, safe=_PCHAR_SAFE))
    return "/" + "/".join(canonical) + ("/" if allow_folder else "")


def _normalize_prefix(prefix: str) -> str:
    try:
        return _canonical_url(prefix.strip(), allow_folder=True)
    except SourceRejectedError as exc:
        raise ValueError(f"allowed prefix {prefix!r}: {exc}") from None


def _normalize_local_path(value: str, root: Path | None) -> str:
    if root is None:
        raise SourceRejectedError(
            "local paths are only allowed in local mode; use an https blob URL"
        )
    candidate = Path(value)
    if not candidate.is_absolute():
        candidate = root / candidate  # relative paths are relative to the allowed root
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise SourceRejectedError(f"cannot resolve the path: {exc}") from None
    # After resolving, so neither ".." nor a symlink can lead out of the root.
    if not resolved.is_relative_to(root):
        raise SourceRejectedError(f"the path is outside the allowed root {root}")
    try:
        is_file = resolved.is_file()
    except OSError as exc:  # a name too long, a folder we may not enter...
        raise SourceRejectedError(f"cannot read the path: {exc.strerror}") from None
    if not is_file:
        raise SourceRejectedError("no such file")
    return f"file://{resolved}"


# --------------------------------------------------------------------------------------------
# The worker's side: which blob a source names


@dataclass(frozen=True)
class BlobLocation:
    """A blob a source names: its account's blob endpoint, container and (decoded) name."""

    account_url: str
    container: str
    name: str


def worker_policy(account_url: str, *, managed_identity: bool) -> SourcePolicy:
    """What a worker may read: any blob of its own account; with managed identity, any Azure
    storage account's blobs too (a shared key reaches its own account only).

    Its prefixes are account roots, never containers, as :func:`locate_blob` expects.
    """
    return SourcePolicy(
        allowed_prefixes=(account_url.rstrip("/") + "/",), any_azure_account=managed_identity
    )


def locate_blob(source: str, policy: SourcePolicy) -> BlobLocation:
    """The blob ``source`` names under a :func:`worker_policy`; SourceRejectedError if none.

    The account is the allowed prefix the source is under (an Azurite account lives in the
    path, ``http://127.0.0.1:10000/devstoreaccount1/``), or, for another Azure account, the
    source's host.
    """
    url = normalize_source(source, policy)
    if url.startswith("file://"):
        raise SourceRejectedError("a local path is not a blob")
    account = next((p for p in policy.allowed_prefixes if url.startswith(p)), None)
    if account is not None:
        account_url, rest = account.rstrip("/"), url[len(account) :]
    else:  # allowed by any_azure_account: canonical, so the host is all of the netloc
        parts = urlsplit(url)
        account_url, rest = f"https://{parts.hostname}", parts.path.lstrip("/")
    container, _, name = rest.partition("/")
    if not container or not name:
        raise SourceRejectedError("the URL names no blob (container/name)")
    return BlobLocation(account_url=account_url, container=container, name=unquote(name))
