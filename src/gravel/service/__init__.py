"""The HTTP service (`gravel serve`): models, sessions, encrypted inference and jobs over a
versioned API, on a SQLite + blob store, running inferences in-process or on Ray.

Server role: it imports gravel.server and gravel.cluster; client code never imports it.
"""

from gravel.service.app import create_app
from gravel.service.config import ServiceConfig

__all__ = ["ServiceConfig", "create_app"]
