"""The files the service serves itself: the dashboard, its script, plotly.js, Swagger UI (never a CDN)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spectraldb.errors import MissingPackage

STATIC = Path(__file__).resolve().parent / "dashboard"
DASHBOARD = STATIC / "index.html"


def package_file(package: str, *parts: str, hint: str) -> Path:
    """A file shipped inside an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackage(hint)
    return Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)


def plotly_bundle() -> Path:
    """plotly.js as the `plotly` PyPI package ships it."""
    return package_file("plotly", "package_data", "plotly.min.js",
                        hint="the dashboard needs the plotly package: pip install plotly")


def swagger_asset(name: str) -> Path:
    """Swagger UI as the `fastapi-offline` PyPI package ships it: /docs works offline."""
    return package_file("fastapi_offline", "static", name,
                        hint="/docs needs the fastapi-offline package: pip install fastapi-offline")


# /static/{name}: exactly these files, nothing else
FILES = {"plotly.min.js": plotly_bundle, "dashboard.js": lambda: STATIC / "dashboard.js",
         "docs.js": lambda: STATIC / "docs.js", "swagger-ui-bundle.js": lambda: swagger_asset("swagger-ui-bundle.js"),
         "swagger-ui.css": lambda: swagger_asset("swagger-ui.css")}
