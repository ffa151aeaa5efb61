"""The Azure Functions app (Python v2 programming model).

It only builds the app and registers the blueprints: no settings, no connections and no
logging set-up at import time, so that a bad setting or an unreachable database never
hides the functions from the host.
"""

import azure.functions as func

from recsys.http.batches import bp as batches_bp
from recsys.http.health import bp as health_bp
from recsys.http.items import bp as items_bp
from recsys.http.loader import bp as loader_bp
from recsys.http.maintenance import bp as maintenance_bp
from recsys.http.openapi import bp as openapi_bp
from recsys.http.recommendations import bp as recommendations_bp

app = func.FunctionApp(http_auth_level=func.AuthLevel.FUNCTION)
app.register_functions(health_bp)
app.register_functions(items_bp)
app.register_functions(recommendations_bp)
app.register_functions(batches_bp)
app.register_functions(loader_bp)
app.register_functions(maintenance_bp)
app.register_functions(openapi_bp)
