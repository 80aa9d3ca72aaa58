"""The Functions app's composition root: its services, built once, at the first call.

Not at import: the settings come from the app's environment, and a missing one must fail
the function that needs it, naming the variable, rather than hide every function when the
host indexes the app.
"""

from __future__ import annotations

import functools

from batchctl.services import Services, backend_from_settings, build_services
from batchctl.settings import ControllerSettings


@functools.cache
def app_services() -> Services:
    settings = ControllerSettings()  # from the app's environment, once
    return build_services(settings, backend_from_settings(settings))
