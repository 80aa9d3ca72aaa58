"""Durable instance queries that read every page, not only the first.

The Durable extension answers ``GET {rpcBaseUrl}instances/?createdTimeFrom=..&runtimeStatus=..``
one page at a time (``OrchestrationStatusQueryCondition.PageSize`` defaults to 100) and puts the
next page's token in the ``x-ms-continuation-token`` response header; the caller sends it back
in the same request header (``HttpApiHandler.HandleGetStatusRequestAsync`` in
Azure/azure-functions-durable-extension). The Python SDK's ``get_status_by`` (1.7.0) makes one
request and drops the response headers (``utils.http_utils.get_async_request`` returns only the
status and the body), so ``GET /api/runs`` and the sweeper would see only the first 100 runs.

Here the same URL the SDK builds (its own ``RpcManagementOptions``) is read page by page. The
local server's client answers a whole query at once and keeps its ``get_status_by``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import aiohttp
import azure.durable_functions as df
from azure.durable_functions.models.DurableOrchestrationStatus import DurableOrchestrationStatus
from azure.durable_functions.models.RpcManagementOptions import RpcManagementOptions

CONTINUATION_HEADER = "x-ms-continuation-token"
# The extension sends the header with an empty value on the last page (its HttpApiHandlerTests
# assert string.Empty). Older Azure Storage providers serialized a missing token as the
# base64 of "null"; both mean "no further page".
_NO_FURTHER_PAGE = frozenset({"", "null", "bnVsbA=="})
# The SDK's own client session allows 240 s for one request to the host's local endpoint.
_REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=240, sock_connect=10)


class InstanceQueryError(RuntimeError):
    """The Durable extension refused an instance query, or its paging went wrong."""


def next_token(header: str | None) -> str | None:
    """The continuation token to send for the next page, or None after the last page."""
    if header is None or header.strip() in _NO_FURTHER_PAGE:
        return None
    return header


async def query_instances(
    client: Any,
    *,
    created_time_from: datetime | None = None,
    runtime_status: Iterable[df.OrchestrationRuntimeStatus] | None = None,
) -> list[Any]:
    """Every orchestration instance matching the filters, over all of the extension's pages."""
    statuses = list(runtime_status) if runtime_status is not None else None
    if not isinstance(client, df.DurableOrchestrationClient):
        # The local server's client (batchctl.local.server) has no pages to follow.
        return list(
            await client.get_status_by(created_time_from=created_time_from, runtime_status=statuses)
        )
    # The SDK keeps the binding's RPC base URL and the invocation id (for the host's logs)
    # private; they are what its own get_status_by uses.
    base_url = client._orchestration_bindings.rpc_base_url
    url = RpcManagementOptions(created_time_from=created_time_from, runtime_status=statuses).to_url(
        base_url
    )
    invocation_id = getattr(client, "_function_invocation_id", None)
    return await read_all_pages(url, invocation_id)


async def read_all_pages(url: str, invocation_id: str | None = None) -> list[Any]:
    """GET ``url`` and each page its continuation token names, as Durable statuses."""
    found: list[Any] = []
    token: str | None = None
    seen: set[str] = set()
    page = 0
    async with aiohttp.ClientSession(timeout=_REQUEST_TIMEOUT) as session:
        while True:
            page += 1
            headers = {CONTINUATION_HEADER: token} if token else {}
            if invocation_id:
                headers["X-Azure-Functions-InvocationId"] = invocation_id
            async with session.get(url, headers=headers) as response:
                # The status first: an error page may be HTML or plain text, and its JSON
                # parse error would hide the status this error exists to name.
                if response.status != 200:
                    text = await response.text(errors="replace")
                    raise InstanceQueryError(
                        f"the Durable instance query GET {url} (page {page}) answered "
                        f"{response.status}: {text[:300]}"
                    )
                try:
                    body = await response.json(content_type=None)
                except ValueError as error:
                    raise InstanceQueryError(
                        f"the Durable instance query GET {url} (page {page}) answered 200 "
                        f"with a body that is not JSON ({error})"
                    ) from error
                if not isinstance(body, list):
                    raise InstanceQueryError(
                        f"the Durable instance query GET {url} (page {page}) answered a "
                        f"{type(body).__name__}, not a list of instances: {str(body)[:300]}"
                    )
                found.extend(DurableOrchestrationStatus.from_json(item) for item in body)
                token = next_token(response.headers.get(CONTINUATION_HEADER))
            if token is None:
                return found
            if token in seen:
                raise InstanceQueryError(
                    f"the Durable instance query GET {url} repeated continuation token "
                    f"{token[:60]!r} at page {page}; stopping rather than looping"
                )
            seen.add(token)
