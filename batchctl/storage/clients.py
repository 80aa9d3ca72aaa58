"""Credentials and SDK clients built from settings: one place decides how we authenticate."""

from __future__ import annotations

import functools
from typing import Any

from azure.core.credentials import AzureNamedKeyCredential

from batchctl.settings import AZURITE_ACCOUNT_KEY, AZURITE_ACCOUNT_NAME, StorageSettings


@functools.cache
def _default_credential() -> Any:
    # Imported lazily: azure-identity is slow to import and local mode never needs it.
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


@functools.cache
def _default_async_credential() -> Any:
    from azure.identity.aio import DefaultAzureCredential

    return DefaultAzureCredential()


def sync_credential(settings: StorageSettings) -> Any:
    """Managed identity in Azure; Azurite's published development key in local mode."""
    if settings.storage_auth == "azurite":
        return AzureNamedKeyCredential(AZURITE_ACCOUNT_NAME, AZURITE_ACCOUNT_KEY)
    return _default_credential()


def async_credential(settings: StorageSettings) -> Any:
    if settings.storage_auth == "azurite":
        return AzureNamedKeyCredential(AZURITE_ACCOUNT_NAME, AZURITE_ACCOUNT_KEY)
    return _default_async_credential()
