"""The Azure Functions app: builds the Durable app and registers the blueprints. Nothing else.

Settings are read when a function first runs (never here), so a missing setting fails that
function with the variable named instead of hiding every function at indexing time.
"""

import azure.durable_functions as df
import azure.functions as func

from activities.blueprint import bp as activities
from batchctl.functions.blueprint import bp as client_functions
from orchestrators.blueprint import bp as orchestrators

app = df.DFApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(orchestrators)
app.register_functions(activities)
app.register_functions(client_functions)
