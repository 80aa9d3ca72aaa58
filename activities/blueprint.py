"""Registers every activity with the Functions host, under its own name, bound to the app's
services (built once, at the first call: see batchctl.functions.app_services)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import azure.durable_functions as df

from activities import make_activities
from batchctl.functions.app_services import app_services

bp = df.Blueprint()


def _register(name: str, function: Callable[[Any], Any]) -> None:
    # A fresh function object per activity: the decorators attach metadata to the function.
    def activity(payload: Any) -> Any:
        return function(payload)

    activity.__name__ = activity.__qualname__ = name
    bp.function_name(name)(bp.activity_trigger(input_name="payload")(activity))


for _name, _function in make_activities(app_services).items():
    _register(str(_name), _function)
