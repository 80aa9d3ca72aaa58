"""The Azure Functions app: builds the Durable app and registers the blueprints.

Settings are read when a function first runs (never here), so a missing setting fails that
function with the variable named instead of hiding every function at indexing time. The one
thing done at import is best-effort telemetry: OpenTelemetry to Application Insights when
deployed, and the run and item ids on every log line.
"""

import logging

import azure.durable_functions as df
import azure.functions as func

from activities.blueprint import bp as activities
from batchctl.functions.blueprint import bp as client_functions
from batchctl.logs import add_context_to_existing_handlers, configure_telemetry
from orchestrators.blueprint import bp as orchestrators

try:
    configure_telemetry()
except Exception:  # telemetry must never stop the functions from loading
    logging.getLogger(__name__).exception("OpenTelemetry set-up failed; continuing without it")
add_context_to_existing_handlers("", "batchctl")

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(orchestrators)
app.register_functions(activities)
app.register_functions(client_functions)
