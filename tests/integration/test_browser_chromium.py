"""The manifest browser in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The app runs under uvicorn on 127.0.0.1 (ephemeral port) over a registry built with the registry API
(`sample_registry`), or over the registry named by BLIP_BROWSER_TEST_REGISTRY (e.g. one made by the demo
pipeline). The test loads the pages, checks that thumbnails decode (naturalWidth > 0) and captions render,
applies a filter and compares with the JSON API, opens a diff, and saves screenshots under
test-output/browser/.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from datasets_manifests.browser.app import create_app
from datasets_manifests.browser.sample_registry import build_sample_registry

CHROMIUM = "/usr/bin/chromium"
pytestmark = [pytest.mark.integration, pytest.mark.browser]


@pytest.fixture(scope="module", params=["sample", "pipeline"])
def registry_source(request: pytest.FixtureRequest) -> str:
    """Which registry the browser is tested on: the registry API's sample one, or the demo pipeline's."""
    return "given" if os.environ.get("BLIP_BROWSER_TEST_REGISTRY") else request.param


@pytest.fixture(scope="module")
def registry_url(registry_source: str, request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> str:
    if registry_source == "given":
        return os.environ["BLIP_BROWSER_TEST_REGISTRY"]
    if registry_source == "pipeline":
        return str(request.getfixturevalue("pipeline_registry"))
    root = tmp_path_factory.mktemp("chromium") / "registry"
    build_sample_registry(root)
    return str(root)


@pytest.fixture(scope="module")
def server(registry_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    app = create_app(registry_url, thumb_cache_dir=tmp_path_factory.mktemp("thumbs"))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    host, port = uv.servers[0].sockets[0].getsockname()[:2]
    assert host == "127.0.0.1"
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser_page(server: str) -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        yield page
        browser.close()


@pytest.fixture(scope="module")
def shots(test_output_dir: Path, registry_source: str) -> Path:
    path = test_output_dir / "browser" / registry_source
    path.mkdir(parents=True, exist_ok=True)
    return path


def _api(server: str, path: str) -> Any:
    response = httpx.get(server + path, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _pick_versions(server: str) -> tuple[dict, dict, dict]:
    """A dataset with CapFilt texts (or any indexed one), and two dataset versions to diff."""
    datasets = [v for v in _api(server, "/api/versions")["versions"] if v["kind"] == "dataset"]
    details = {v["ref"]: _api(server, f"/api/versions/dataset/{v['name']}/{v['version']}") for v in datasets}
    indexed = [v for v in datasets if (details[v["ref"]]["parquet"] or {}).get("index")]
    assert indexed, "the registry has no dataset version with a per-sample index"
    with_texts = [v for v in indexed if details[v["ref"]]["parquet"].get("texts")]
    main = (with_texts or indexed)[-1]
    # Diff a version against one of its dataset parents when there is one, else the first two indexed versions.
    parent_refs = [p["ref"] for p in details[main["ref"]]["parents"] if p["kind"] == "dataset"]
    older = next((v for v in indexed if v["ref"] in parent_refs), indexed[0])
    return main, older, main if older["ref"] != main["ref"] else indexed[-1]


def _wait_for_thumbnails(page: Any, count: int) -> list[int]:
    page.locator("[data-testid=sample-grid]").scroll_into_view_if_needed()
    page.wait_for_function(
        """count => {
            const imgs = [...document.querySelectorAll('[data-testid=sample-grid] img.thumb')].slice(0, count);
            return imgs.length > 0 && imgs.every(img => img.complete);
        }""", arg=count, timeout=30_000)
    return page.eval_on_selector_all("[data-testid=sample-grid] img.thumb", "imgs => imgs.map(i => i.naturalWidth)")


def test_pages_thumbnails_filters_and_diff(server: str, browser_page: Any, shots: Path) -> None:
    page = browser_page
    main, older, newer = _pick_versions(server)

    page.goto(server + "/")
    page.wait_for_selector("[data-testid=datasets]")
    assert main["name"] in page.inner_text("[data-testid=datasets]")
    page.screenshot(path=str(shots / "home.png"), full_page=True)

    # One version: lineage, histograms, files, sample grid with thumbnails and captions.
    page.set_viewport_size({"width": 1400, "height": 2600})  # the first rows of the grid in view (lazy images)
    page.goto(f"{server}/#/v/dataset/{main['name']}/{main['version']}")
    page.wait_for_selector("[data-testid=sample-grid] .sample")
    page.wait_for_selector("[data-testid=histogram] rect")
    assert page.locator("[data-testid=lineage] rect").count() >= 1
    first_page = _api(server, f"/api/versions/dataset/{main['name']}/{main['version']}/samples?limit=24")
    assert page.locator("[data-testid=sample-grid] .sample").count() == len(first_page["samples"])
    widths = _wait_for_thumbnails(page, 4)
    assert widths[0] > 0 and sum(w > 0 for w in widths[:4]) >= 3, widths
    captions = page.locator("[data-testid=caption]").all_inner_texts()
    first = first_page["samples"][0]
    expected_texts = [t["text"] for t in first["texts"]] or [first["caption"]]
    assert all(any(text in shown for shown in captions) for text in expected_texts)
    page.screenshot(path=str(shots / "version.png"), full_page=True)

    # A filter, checked against the JSON API.
    if first_page["has_texts"]:
        page.select_option("select[name=source]", "synthetic")
        page.fill("input[name=min_score]", "0.8")
        query = "source=synthetic&min_score=0.8"
    else:
        word = first["caption"].split()[0]
        page.fill("input[name=q]", word)
        query = f"q={word}"
    marker = query.split("&")[-1]
    with page.expect_response(lambda response: "/samples?" in response.url and marker in response.url):
        page.click("#sample-filters button[type=submit]")
    expected = _api(server, f"/api/versions/dataset/{main['name']}/{main['version']}/samples?{query}&limit=24")
    page.wait_for_function(
        "total => document.querySelector('[data-testid=sample-total]')?.textContent.startsWith(total)",
        arg=f"{expected['total']:,}")
    shown_keys = page.eval_on_selector_all("[data-testid=sample-grid] .sample", "cards => cards.map(c => c.dataset.key)")
    assert shown_keys == [s["key"] for s in expected["samples"]]
    if expected["samples"]:
        _wait_for_thumbnails(page, 1)
    page.screenshot(path=str(shots / "filtered.png"), full_page=True)

    # The diff view between two versions.
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{server}/#/diff?a={older['ref']}&b={newer['ref']}")
    page.wait_for_selector("[data-testid=diff-table]")
    diff = _api(server, f"/api/diff?a={older['ref']}&b={newer['ref']}")
    for category, count in diff["counts"].items():
        assert f"{category}: {count:,}" in page.inner_text(f"[data-testid=diff-{category}]")
    preference = ("recaptioned", "added", "newly_dropped", "restored", "removed")
    changed = next((c for c in preference if diff["counts"].get(c)), None)
    if changed:
        page.click(f"[data-testid=diff-{changed}]")
        page.wait_for_function("c => location.hash.includes('category=' + c)", arg=changed)
        page.wait_for_selector("tr.diffrow")
        assert page.locator("tr.diffrow").count() == min(50, diff["counts"][changed])
        # The first rows are in view; further ones load lazily on scroll (a long diff has up to 50 rows a page).
        page.wait_for_function("() => [...document.querySelectorAll('tr.diffrow img')].slice(0, 4).every(i => i.complete)")
        widths = page.eval_on_selector_all("tr.diffrow img", "imgs => imgs.slice(0, 4).map(i => i.naturalWidth)")
        assert widths and max(widths) > 0
    page.screenshot(path=str(shots / "diff.png"), full_page=True)

    page.goto(f"{server}/#/models")
    page.wait_for_selector("[data-testid=models], .card")
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    assert page.errors == []


def test_missing_image_shows_an_error_panel(server: str, browser_page: Any, shots: Path,
                                            registry_source: str) -> None:
    if registry_source != "sample":
        pytest.skip("needs the sample registry's dropped-before-sharding sample")
    page = browser_page
    page.goto(f"{server}/#/v/dataset/web-demo/v1?decision=dropped")
    panel = page.wait_for_selector("[data-testid=image-error]", timeout=30_000)
    assert "too_small" in panel.inner_text()
    page.locator("[data-testid=sample-grid]").screenshot(path=str(shots / "error-panel.png"))
    assert page.errors == []
