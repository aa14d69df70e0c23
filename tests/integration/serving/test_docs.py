"""`/docs` and `/redoc` work without internet: every asset they load is served by the scorer."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.app import create_app
from serving.config import ServingSettings
from serving.docs import mount_docs

# src=/href= attributes, Swagger UI's `url: '...'` and ReDoc's `spec-url="..."`
REFERENCE = re.compile(r"""(?:\b(?:src|href|spec-url)=|\burl:\s*)["']([^"']+)["']""")
EXPECTED_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


def references(html: str) -> list[str]:
    return REFERENCE.findall(html)


def check_docs(client: TestClient) -> None:
    for page, title in (("/docs", "Swagger UI"), ("/redoc", "ReDoc")):
        response = client.get(page)
        assert response.status_code == 200, page
        assert response.headers["content-type"].startswith("text/html")
        assert title in response.text
        urls = references(response.text)
        assert urls, f"{page} references nothing"
        assert not re.search(r"https?://|//[a-z]", response.text), f"{page} loads a remote URL"
        assert "/openapi.json" in urls, page
        assets = [url for url in urls if url != "/openapi.json"]
        assert any(url.endswith(".js") for url in assets), page
        for url in assets:
            assert url.startswith("/"), url
            asset = client.get(url)
            assert asset.status_code == 200, url
            assert len(asset.content) > 1000, url
            suffix = Path(url).suffix
            assert EXPECTED_TYPES[suffix] in asset.headers["content-type"], url
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    assert not {"/docs", "/redoc"} & set(spec.json()["paths"]), "doc pages are not API routes"


def test_mount_docs_serves_local_assets() -> None:
    app = FastAPI(title="t", docs_url=None, redoc_url=None)
    mount_docs(app)
    with TestClient(app) as client:
        check_docs(client)


def test_mount_docs_honours_root_path() -> None:
    app = FastAPI(title="t", docs_url=None, redoc_url=None)
    mount_docs(app)
    with TestClient(app, root_path="/scorer") as client:
        urls = references(client.get("/docs").text)
    assert urls and all(url.startswith("/scorer/") for url in urls), urls


@pytest.fixture(scope="module")
def scorer(trained_artifact: Path) -> Iterator[TestClient]:
    settings = ServingSettings(model_dir=trained_artifact.parent,
                               model_version=trained_artifact.name)
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.integration
def test_scorer_docs_need_no_cdn(scorer: TestClient) -> None:
    check_docs(scorer)
