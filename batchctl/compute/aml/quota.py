"""The region's AML quota, read from its listings, and the plan sized under it.

Both SDKs hand back the records of the same two REST operations (usages and vmSizes), so
one parser serves both gateways; a refused read (401/403) costs the plan its quota cap,
never the run. Nothing here imports an Azure SDK.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Final

from batchctl.compute.aml.settings import AmlSettings
from batchctl.compute.base import ComputeError, Quota
from batchctl.contracts import MediaSummary, RunOptions, RunPlan
from batchctl.planning import (
    find_vm_size,
    inputs_from_options,
    media_notes,
    media_work_of,
    packed,
    plan_run,
)

__all__ = ["plan_with_quota", "quota_from_listings", "refusal_status", "unknown_quota"]


def plan_with_quota(
    run_id: str,
    work_units: int,
    options: RunOptions,
    quota: Quota | None,
    aml: AmlSettings,
    *,
    media: MediaSummary | None = None,
) -> RunPlan:
    """The plan for ``work_units`` queue messages under ``quota``, sized by planning.

    Per item: each message holds ``options.mini_batch_size`` items (1 while a run has not
    chosen its size yet), so it takes that many times ``aml.sec_per_item`` on one node. By
    video length, when the run gives ``sec_per_video_s`` and the manifest a ``duration_s``
    column (``media``): its pieces (videos, or their segments) at that rate, the longest
    one bounding the makespan (planning's list-scheduling model). The price is the
    setting's, else the one AML lists for the region, else the indicative table's.
    """
    known = find_vm_size(options.vm_size)
    price = aml.price_per_hour
    if price is None and quota is not None:
        price = quota.price_per_hour
    by_video = media is not None and options.sec_per_video_s is not None
    inputs = inputs_from_options(
        media.items if by_video and media is not None else work_units,
        0.0 if by_video else aml.sec_per_item * (options.mini_batch_size or 1),
        options,
        startup_s=aml.startup_s,
        quota_cores=quota.available_cores if quota is not None else None,
        cores_per_vm=quota.cores_per_vm if quota is not None else (known.cores if known else 1),
        price_per_hour=price,
        headroom=aml.headroom,
        max_clusters=aml.max_clusters,
        # Nodes take whole messages: k unsplit items to one (segments one each).
        media=packed(media_work_of(media), options.items_per_message)
        if by_video and media is not None
        else None,
        sec_per_video_s=options.sec_per_video_s if by_video else None,
    )
    plan = plan_run(run_id, inputs)
    notes = list(plan.notes)
    if by_video and media is not None:
        notes += media_notes(media)
    elif options.sec_per_video_s is not None:
        notes.append(
            "sec_per_video_s is set but the manifest has no duration_s column: planned per "
            f"item at {aml.sec_per_item:g} s"
        )
    if quota is not None:
        notes += quota.notes
    return plan.model_copy(update={"notes": notes})


# --------------------------------------------------------------------------------------------
# When the quota cannot be read
# --------------------------------------------------------------------------------------------
#
# The usages and vmSizes listings are subscription-scope operations
# (Microsoft.MachineLearningServices/locations/usages/read and .../locations/vmsizes/read);
# every other role the controller holds is scoped to the workspace. infra/ grants the two
# read actions at subscription scope, but a deployment that skipped that role, or one whose
# role assignment has not propagated yet, gets 403 here. That must cost the plan its quota
# cap, not the run: the plan goes ahead uncapped and says so, and AML itself still refuses
# nodes beyond the quota (they stay queued).

_REFUSAL_CODES: Final = {
    "authorizationfailed": 403,
    "linkedauthorizationfailed": 403,
    "forbidden": 403,
    "unauthorized": 401,
}
_V1_STATUS: Final = re.compile(r"response code: (40[13])\b")


def refusal_status(error: BaseException) -> int | None:
    """401 or 403 when ``error`` says the caller may not read something, in either SDK.

    Duck-typed, so this module imports no SDK: azure-core's ``HttpResponseError`` carries
    ``status_code`` and ``error.code``; ``ClientAuthenticationError`` is a 401 by type name;
    azureml-core's ``ComputeTargetException`` only has its message ("Response Code: 403").
    """
    if type(error).__name__ == "ClientAuthenticationError":
        return 401
    status = getattr(error, "status_code", None)
    if status is None:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return int(status)
    code = getattr(getattr(error, "error", None), "code", None)
    if isinstance(code, str) and code.lower() in _REFUSAL_CODES:
        return _REFUSAL_CODES[code.lower()]
    found = _V1_STATUS.search(str(error).lower())
    return int(found.group(1)) if found else None


def unknown_quota(vm_size: str, *, low_priority: bool, reason: str) -> Quota:
    """A Quota with no limit (the planner then applies none) that says why in its notes.

    Cores come from the known-size table so that the plan can still be priced and split;
    an unknown size counts as one core a VM, which only matters once a limit is known.
    """
    known = find_vm_size(vm_size)
    tier = "low-priority" if low_priority else "dedicated"
    notes = [
        f"quota unknown: {reason}; the plan is not capped by the {tier} quota "
        "(nodes beyond the real quota stay queued in AML)"
    ]
    if known is None:
        notes.append(f"cores of {vm_size} unknown: counted as 1 per VM")
    return Quota(
        vm_size=vm_size,
        low_priority=low_priority,
        cores_per_vm=known.cores if known else 1,
        gpus_per_vm=known.gpus if known else None,
        family=known.family if known else "",
        notes=notes,
    )


# --------------------------------------------------------------------------------------------
# Reading AML quota listings (both gateways hand them over as the SDK parsed them)
# --------------------------------------------------------------------------------------------
#
# Both SDKs hand back the records of the same REST operations: ".../locations/{loc}/usages"
# and ".../locations/{loc}/vmSizes". Depending on the SDK and its version a record is a dict
# with the wire's camelCase keys, an object with snake_case attributes, or (azure-ai-ml 1.35:
# its Usage and VmSize entities copy ``as_dict()`` into ``__dict__``) an object with both, the
# snake_case ones left None. ``_field`` reads whichever is there.
#
# Usage records that matter (subscription level, per region), by ``type``:
#   .../vmFamily/usages          "Standard NCASv3_T4 Family Cluster Dedicated vCPUs" (limit)
#                                "Standard NCASv3_T4 Family Cluster LowPriority vCPUs" (-1:
#                                no per-family low-priority limit)
#   .../dedicatedCores/usages    "Total Cluster Dedicated Regional vCPUs"
#   .../lowPriorityCores/usages  "Total Cluster LowPriority Regional vCPUs"
# Workspace- and compute-level records (types with "/workspaces/") repeat subsets of these and
# are ignored.

_SUBSCRIPTION_USAGE_TYPES: Final = (
    "/vmfamily/usages",
    "/dedicatedcores/usages",
    "/lowprioritycores/usages",
)


def _field(record: object, *names: str) -> object:
    for name in names:
        if isinstance(record, Mapping):
            value = record.get(name)
        else:
            value = getattr(record, name, None)
            if value is None:
                value = getattr(record, "__dict__", {}).get(name)
        if value is not None:
            return value
    return None


def _as_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float | str):
        try:
            return int(value)
        except ValueError:
            return None
    return None


def _squash(text: str) -> str:
    """Lower-case letters and digits only: 'standardNCASv3_T4Family' ~ 'Standard NCASv3_T4 ...'."""
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _usage_name(record: object) -> str:
    name = _field(record, "name")
    if isinstance(name, str):
        return name
    value = _field(name, "value", "localized_value", "localizedValue") if name is not None else None
    return value if isinstance(value, str) else ""


def _vm_prices(record: object) -> tuple[float | None, float | None]:
    """Linux (dedicated, low-priority) USD prices per hour from a vmSizes record."""
    prices = _field(record, "estimated_vm_prices", "estimatedVMPrices")
    values = _field(prices, "values") if prices is not None else None
    dedicated = low_priority = None
    for entry in values if isinstance(values, list) else []:
        if str(_field(entry, "os_type", "osType") or "").lower() != "linux":
            continue
        price = _field(entry, "retail_price", "retailPrice")
        if not isinstance(price, int | float):
            continue
        tier = _squash(str(_field(entry, "vm_tier", "vmTier") or ""))
        if tier == "standard":
            dedicated = float(price)
        elif tier in {"lowpriority", "spot"}:
            low_priority = float(price)
    return dedicated, low_priority


def quota_from_listings(
    vm_size: str,
    *,
    low_priority: bool,
    sizes: Sequence[object],
    usages: Sequence[object],
) -> Quota:
    """The Quota for ``vm_size`` from the region's vmSizes and usages records.

    The size's cores, GPUs, family and price come from ``sizes``; when the region lists
    sizes but not this one, it is not offered there and ComputeError says so. With no size
    records at all (SDK v1 lists no family), the known-size table stands in. The free cores
    are the smallest headroom of the limits that apply: the family's limit and the regional
    dedicated total for dedicated nodes; the regional low-priority total (and a family limit
    if one is set) for low-priority nodes.
    """
    notes: list[str] = []
    wanted = vm_size.lower()
    record = next(
        (s for s in sizes if str(_field(s, "name") or "").lower() == wanted),
        None,
    )
    known = find_vm_size(vm_size)
    if record is not None:
        cores = _as_int(_field(record, "v_cp_us", "vCPUs", "vcpus"))
        gpus = _as_int(_field(record, "gpus"))
        family = str(_field(record, "family") or "") or (known.family if known else "")
        dedicated_price, low_priority_price = _vm_prices(record)
        capable = _field(record, "low_priority_capable", "lowPriorityCapable")
        if low_priority and capable is False:
            raise ComputeError(f"{vm_size} cannot run as low priority in this region")
    elif sizes and any(_field(s, "name") for s in sizes):
        raise ComputeError(f"{vm_size} is not offered for AML compute in this region")
    else:
        cores = gpus = None
        family = known.family if known else ""
        dedicated_price = low_priority_price = None
    if cores is None or cores < 1:
        if known is None:
            raise ComputeError(f"cannot tell how many cores {vm_size} has")
        cores, gpus = known.cores, gpus if gpus is not None else known.gpus
        notes.append(f"cores of {vm_size} taken from the known-size table")
    price = low_priority_price if low_priority else dedicated_price

    tier_word = "lowpriority" if low_priority else "dedicated"
    total_type = "/lowprioritycores/usages" if low_priority else "/dedicatedcores/usages"
    family_key = _squash(family)
    limits: list[tuple[int, int, str]] = []  # (limit, used, what)
    for usage in usages:
        usage_type = str(_field(usage, "type") or "").lower()
        if not usage_type.endswith(_SUBSCRIPTION_USAGE_TYPES):
            continue
        name = _usage_name(usage)
        limit = _as_int(_field(usage, "limit"))
        used = _as_int(_field(usage, "current_value", "currentValue")) or 0
        if limit is None or limit < 0:
            continue  # -1: no limit of its own at this level
        squashed = _squash(name)
        is_total = usage_type.endswith(total_type)
        is_family = (
            usage_type.endswith("/vmfamily/usages")
            and bool(family_key)
            and squashed.startswith(family_key)
            and tier_word in squashed
        )
        if is_total or is_family:
            limits.append((limit, used, name or usage_type))
    # The tightest record binds (least headroom); without any, the quota is unknown.
    binding = min(limits, key=lambda entry: entry[0] - entry[1]) if limits else None
    if binding is not None:
        notes.append(f"{binding[2]}: {binding[1]} of {binding[0]} cores in use")
    else:
        notes.append(f"no {tier_word} quota record found for {vm_size}: quota not applied")
    return Quota(
        vm_size=vm_size,
        low_priority=low_priority,
        cores_per_vm=cores,
        gpus_per_vm=gpus,
        family=family,
        limit_cores=binding[0] if binding else None,
        used_cores=binding[1] if binding else None,
        price_per_hour=price,
        notes=notes,
    )
