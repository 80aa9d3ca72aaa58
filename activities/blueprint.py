"""Registers every activity in ``ACTIVITIES`` with the Functions host, under its own name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import azure.durable_functions as df

from activities import ACTIVITIES

bp = df.Blueprint()


def _register(name: str, function: Callable[[Any], Any]) -> None:
    # A fresh function object per activity: the decorators attach metadata to the function.
    def activity(payload: Any) -> Any:
        return function(payload)

    activity.__name__ = activity.__qualname__ = name
    bp.function_name(name)(bp.activity_trigger(input_name="payload")(activity))


for _name, _function in ACTIVITIES.items():
    _register(str(_name), _function)
