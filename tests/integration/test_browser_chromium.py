"""The manifest browser in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

The app runs under uvicorn on 127.0.0.1 (ephemeral port) over a registry built with the registry API
(`sample_registry`), or over the registry named by BLIP_BROWSER_TEST_REGISTRY (e.g. one made by the demo
pipeline). The test loads the pages, checks that thumbnails decode (naturalWidth > 0) and captions render,
applies a filter and compares with the JSON API, opens a diff, and saves screenshots under
test-output/browser/.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from datasets_manifests.browser.app import create_app
from datasets_manifests.browser.sample_registry import build_sample_registry, make_samples, write_dataset_files
from datasets_manifests.manifest import Producer
from datasets_manifests.registry import Registry

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
    _add_broken_shards_version(root)
    return str(root)


def _add_broken_shards_version(root: Path) -> None:
    """`broken-shards@v1`: six samples in two shards, the first deleted and the second overwritten with garbage
    after publishing (as a half-synced or damaged store would leave them)."""
    staging = root.parent / "broken-staging"
    files = write_dataset_files(staging, make_samples(0, 6, random.Random(3)), per_shard=3, split="train")
    Registry(str(root)).publish(kind="dataset", name="broken-shards", staging_dir=staging, files=files,
                                producer=Producer(stage="test"))
    shards = root / "datasets" / "broken-shards" / "v1" / "shards"
    (shards / "train-000000.tar").unlink()
    corrupt = shards / "train-000001.tar"
    corrupt.write_bytes(b"\x00garbage" * (corrupt.stat().st_size // 8))


@pytest.fixture(scope="module")
def server(registry_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import uvicorn

    # wait_s=0: every filter, histogram and diff answers 202 first, so the page's polling is what is tested.
    app = create_app(registry_url, thumb_cache_dir=tmp_path_factory.mktemp("thumbs"), wait_s=0)
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
        message = f"{CHROMIUM} is not installed (apt-get install chromium, or run infra/install_system_deps.sh as root)"
        if os.environ.get("BLIP_REQUIRE_BROWSER") == "1":  # `make test` / `make integration`: no silent skip
            pytest.fail(message)
        pytest.skip(message)
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
    for _ in range(600):  # a long filter or diff answers 202 with its progress until it is there
        response = httpx.get(server + path, timeout=60)
        if response.status_code != 202:
            break
        time.sleep(0.05)
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


def test_pages_thumbnails_filters_and_diff(server: str, browser_page: Any, shots: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    page = browser_page
    from datasets_manifests.browser import query

    masks = query.VersionData._match_masks

    def slow_masks(self, *args):  # a filter takes 1.5 s: the page shows its progress, then the grid
        time.sleep(1.5)
        yield from masks(self, *args)

    monkeypatch.setattr(query.VersionData, "_match_masks", slow_masks)
    statuses: list[int] = []

    def sample_response(response: Any) -> None:
        if "/samples?" in response.url:
            statuses.append(response.status)

    page.on("response", sample_response)
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
    stats_card = page.locator(".card", has=page.locator("h2", has_text="Stats"))
    assert stats_card.locator("pre").count() == 0  # nested stats are dotted key/value rows, not raw JSON
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
    statuses.clear()
    with page.expect_response(lambda response: "/samples?" in response.url and marker in response.url):
        page.click("#sample-filters button[type=submit]")
    page.wait_for_selector("[data-testid=pending] progress")  # the filter's progress while it runs
    page.screenshot(path=str(shots / "filtering.png"), full_page=False)
    expected = _api(server, f"/api/versions/dataset/{main['name']}/{main['version']}/samples?{query}&limit=24")
    page.wait_for_function(
        "total => document.querySelector('[data-testid=sample-total]')?.textContent.startsWith(total)",
        arg=f"{expected['total']:,}")
    shown_keys = page.eval_on_selector_all("[data-testid=sample-grid] .sample", "cards => cards.map(c => c.dataset.key)")
    assert shown_keys == [s["key"] for s in expected["samples"]]
    if expected["samples"]:
        _wait_for_thumbnails(page, 1)
    assert statuses[0] == 202 and statuses[-1] == 200, statuses
    page.remove_listener("response", sample_response)
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

    _check_models_page(server, page)
    page.screenshot(path=str(shots / "models.png"), full_page=True)
    assert page.errors == []


def _check_models_page(server: str, page: Any) -> None:
    """The models table shows every metric of /api/models in its column, evaluation metrics included."""
    models = _api(server, "/api/models")
    versions = _api(server, "/api/versions")["versions"]
    page.goto(f"{server}/#/models")
    if not models["models"]:
        page.wait_for_selector("text=no model versions")
        return
    page.wait_for_selector("[data-testid=models] td a")
    headers = page.eval_on_selector_all("[data-testid=models] th", "cells => cells.map(c => c.textContent.trim())")
    assert headers == ["model", "trained on", *models["columns"]]
    model_refs = {m["ref"] for m in models["models"]}
    if any(v["kind"] == "evaluation" and model_refs & set(v["parents"]) for v in versions):
        assert any(not c.startswith("train/") for c in models["columns"]), "evaluation metrics are missing"
    rows = page.eval_on_selector_all(
        "[data-testid=models] tr", "rows => rows.slice(1).map(r => [...r.cells].map(c => c.textContent.trim()))")
    assert [row[0] for row in rows] == [m["ref"] for m in models["models"]]
    shown = 0
    for row, model in zip(rows, models["models"]):
        for column, cell in zip(models["columns"], row[2:]):
            if column not in model["metrics"]:
                assert cell == "–", (model["ref"], column, cell)
                continue
            assert float(cell.replace(",", "")) == pytest.approx(model["metrics"][column], abs=1e-4), (column, cell)
            shown += not column.startswith("train/")
    if any(not c.startswith("train/") for c in models["columns"]):
        assert shown > 0


def test_work_page_lists_what_blip_data_work_lists(server: str, browser_page: Any, shots: Path) -> None:
    """The Work page draws /api/work (what stage runs left in their work dirs) row for row, with the total."""
    page = browser_page
    work = _api(server, "/api/work")
    page.goto(f"{server}/#/work")
    page.wait_for_selector("[data-testid=work]")
    rows = page.eval_on_selector_all(
        "[data-testid=work] tr", "rows => rows.slice(1).map(r => [...r.cells].map(c => c.textContent.trim()))")
    if not work["entries"]:
        assert rows == [["no work left"]]
        return
    assert [(row[0], row[2]) for row in rows] == [(e["key"], e["state"]) for e in work["entries"]]
    assert page.inner_text("[data-testid=work-total]").startswith(f"{len(work['entries'])} in all")
    page.screenshot(path=str(shots / "work.png"), full_page=True)
    assert not page.errors, page.errors


def test_tags_show_on_the_list_and_the_version_page(server: str, browser_page: Any, registry_url: str) -> None:
    """`blip data tag`: the badge on the home page's row and in the version page's title, as the tag moves (the
    tag is removed again: the registry is shared with the other tests)."""
    from datasets_manifests.tags import remove_tag, set_tag

    page = browser_page
    registry = Registry(registry_url)
    main, _, _ = _pick_versions(server)
    set_tag(registry, main["ref"], "browser-test")
    try:
        page.goto(server + "/")
        page.wait_for_selector("[data-testid=datasets] .badge.tag")
        assert page.locator("[data-testid=datasets] .badge.tag").all_inner_texts() == ["browser-test"]
        page.goto(f"{server}/#/v/dataset/{main['name']}/{main['version']}")
        badge = page.wait_for_selector("[data-testid=tag]")
        assert badge.inner_text() == f"{main['name']}@browser-test"
    finally:
        remove_tag(registry, f"{main['name']}@browser-test")
    page.goto(server + "/")
    page.wait_for_selector("[data-testid=datasets]")
    assert page.locator("[data-testid=datasets] .badge.tag").count() == 0
    assert not page.errors, page.errors


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


def test_a_source_column_shows_on_the_cards_and_filters_by_its_range(server: str, browser_page: Any, shots: Path,
                                                                     registry_source: str) -> None:
    """The source list's CLIP score (`similarity`) on each card, and the grid filtered to a range of it beside
    a CapFilt condition, as the JSON API filters."""
    if registry_source != "sample":
        pytest.skip("needs the sample registry's version with a source column")
    page = browser_page
    base = "/api/versions/dataset/web-demo-capfilt/v1"
    page.goto(f"{server}/#/v/dataset/web-demo-capfilt/v1")
    page.wait_for_selector("[data-testid=sample-grid] .sample")
    # CapFilt's stats along the score: a chart of its web-text decisions in the score's deciles.
    by_score = _api(server, base)["manifest"]["stats"]["capfilt"]["by_source_column"]["similarity"]
    title = f"CapFilt's web texts by the list's similarity (deciles of {sum(by_score['samples'])} samples)"
    page.wait_for_selector(f"#histograms b:has-text(\"{title}\")")
    bars = page.eval_on_selector_all("#histograms svg rect title", "titles => titles.map(t => t.textContent)")
    for label, counts in (("web text kept", by_score["web_text_kept"]),
                          ("web text dropped", [n - k for n, k in zip(by_score["samples"], by_score["web_text_kept"])])):
        shown = [int(bar.split(": ")[1].split(" in ")[0]) for bar in bars if bar.startswith(f"{label}: ")]
        assert shown == [n for n in counts if n > 0], label  # a bar per non-empty bin
    first = _api(server, f"{base}/samples?limit=24")["samples"]
    shown = page.locator("[data-testid=source-columns]").all_inner_texts()
    assert len(shown) == len(first)
    for text, sample in zip(shown, first):
        score = sample["source_columns"]["similarity"]
        assert text.strip() == f"similarity {'–' if score is None else f'{score:.4f}'}"
    page.select_option("select[name=column]", "similarity")
    page.fill("input[name=column_min]", "0.3")
    page.select_option("select[name=source]", "web")
    page.select_option("select[name=decision]", "kept")
    with page.expect_response(lambda response: "/samples?" in response.url and "column_min=0.3" in response.url):
        page.click("#sample-filters button[type=submit]")
    query = "source=web&decision=kept&column=similarity&column_min=0.3"
    expected = _api(server, f"{base}/samples?{query}&limit=24")
    assert 0 < expected["total"] < len(first)  # the range and the filter both narrow it
    assert all(s["source_columns"]["similarity"] >= 0.3 for s in expected["samples"])
    page.wait_for_function(
        "total => document.querySelector('[data-testid=sample-total]')?.textContent.startsWith(total)",
        arg=f"{expected['total']:,}")
    keys = page.eval_on_selector_all("[data-testid=sample-grid] .sample", "cards => cards.map(c => c.dataset.key)")
    assert keys == [s["key"] for s in expected["samples"]]
    assert page.input_value("input[name=column_min]") == "0.3"  # the form keeps the filter it shows
    page.screenshot(path=str(shots / "source-column.png"), full_page=True)
    assert page.errors == []


def test_missing_and_corrupt_shards_show_error_panels(server: str, browser_page: Any, shots: Path,
                                                      registry_source: str) -> None:
    if registry_source != "sample":
        pytest.skip("needs the sample registry's broken-shards version")
    page = browser_page
    page.set_viewport_size({"width": 1400, "height": 2600})  # the whole grid in view (images load lazily)
    page.goto(f"{server}/#/v/dataset/broken-shards/v1")
    page.wait_for_selector("[data-testid=sample-grid] .sample")
    page.locator("[data-testid=sample-grid]").scroll_into_view_if_needed()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=image-error]').length === 6",
                           timeout=30_000)
    panels = page.locator("[data-testid=image-error]").all_inner_texts()
    assert sum("missing from the registry" in text for text in panels) == 3, panels
    assert sum("cannot decode image" in text for text in panels) == 3, panels
    assert page.locator("[data-testid=caption]").count() == 6  # the rest of each card still renders
    page.locator("[data-testid=sample-grid]").screenshot(path=str(shots / "broken-shards.png"))
    assert page.errors == []
