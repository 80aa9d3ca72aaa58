"""Azure ML compute: one backend (``backend.AmlBackend``) over two SDK gateways.

``AmlBackend`` holds every rule about what a run may create, reuse, restart and delete;
``gateway_v2`` (azure-ai-ml, the default) and ``gateway_v1`` (azureml-core, end of support
2026-06-30) only translate its primitive operations to their SDK (``gateway.AmlGateway``).
``settings`` is what both are configured with, ``quota`` reads the region's quota listings
and sizes a plan under them.

This package imports no Azure SDK: the gateways do, and only they, so a process that uses
one SDK never needs the other. Build a backend with ``gateway_v2.backend_from_settings`` or
``gateway_v1.backend_from_settings``.
"""

from batchctl.compute.aml.backend import AmlBackend
from batchctl.compute.aml.gateway import AmlGateway, JobRecord, job_name
from batchctl.compute.aml.quota import plan_with_quota, quota_from_listings
from batchctl.compute.aml.settings import AmlSettings, NodeLaunch, get_aml_settings

__all__ = [
    "AmlBackend",
    "AmlGateway",
    "AmlSettings",
    "JobRecord",
    "NodeLaunch",
    "get_aml_settings",
    "job_name",
    "plan_with_quota",
    "quota_from_listings",
]
