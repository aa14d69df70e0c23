"""`/docs` (Swagger UI) and `/redoc` served with their assets from this process, not a CDN.

FastAPI's built-in pages load their JavaScript and CSS from cdn.jsdelivr.net (and ReDoc its
fonts from Google), so on a machine without internet they render blank.  Here the same pages
point at the copies the `fastapi-offline` wheel ships (Swagger UI bundle and CSS, ReDoc
standalone, favicon), mounted read-only under `/docs-static`.  The app must be created with
`docs_url=None, redoc_url=None` so FastAPI does not register its own pages first.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

STATIC_PATH = "/docs-static"
# The directory of the assets inside the installed `fastapi_offline` package.
ASSETS_DIR = str(files("fastapi_offline") / "static")


def mount_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Add the two documentation pages and the static mount their assets come from."""
    app.mount(STATIC_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-static")

    def base(request: Request) -> str:  # behind a proxy that strips a prefix (root_path)
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = base(request)
        return get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_PATH}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = base(request)
        return get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{STATIC_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_PATH}/favicon.png",
            with_google_fonts=False,
        )
