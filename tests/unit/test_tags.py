"""`blip data tag`: movable names of versions on a local and a memory:// registry — resolved wherever a version
is asked for, moved with their history, never mistaken for a version or an id, and keeping a version from being
removed whole."""

from __future__ import annotations

import json

import pytest

from datasets_manifests.registry import NotFoundError, Registry, RegistryError
from datasets_manifests.tags import check_tag, set_tag
from pipelines.cli import main

from datasets_fixtures import memory_url, publish_dataset, sample_rows


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    """raw@v1, raw@v2 (4 samples), capfilt@v1 made from raw@v1."""
    registry = Registry(tmp_path / "registry" if request.param == "local" else memory_url())
    raw = publish_dataset(registry, tmp_path / "raw1", "raw", sample_rows(3))
    publish_dataset(registry, tmp_path / "raw2", "raw", sample_rows(4))
    publish_dataset(registry, tmp_path / "cf", "capfilt", sample_rows(3), parents=(raw,), stage="capfilt")
    return registry


def data(capsys, registry: Registry, *args: str) -> tuple[int, str, str]:
    code = main(["data", "--registry", registry.url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_tag_names_a_version_wherever_one_is_asked_for_and_moves_with_its_history(registry, capsys):
    assert data(capsys, registry, "tag", "raw@v1", "prod")[1].strip() == "raw@prod -> raw@v1"
    assert registry.resolve("raw@prod").version == "v1"
    # Lineage records ids: a child made from raw@prod names raw@v1, whatever the tag names later.
    assert registry.resolve("capfilt").parents == ("raw@v1",)
    assert data(capsys, registry, "tag", "raw@latest", "prod")[1].strip() == "raw@prod -> raw@v2 (was raw@v1)"
    assert registry.resolve("raw@prod").version == "v2"
    assert "names raw@v2 already" in data(capsys, registry, "tag", "raw@v2", "prod")[1]
    data(capsys, registry, "tag", "raw@prod", "reviewed")  # a tag of a tag: the version it names
    record = registry.tag_record("dataset", "raw", "prod")
    assert record["version"] == "v2" and [entry["version"] for entry in record["history"]] == ["v1"]
    assert "@" in record["by"] and record["tagged_at"]

    _, out, _ = data(capsys, registry, "show", "raw@prod")
    assert "raw@v2" in out.splitlines()[0] and "tag raw@prod: since" in out and "(before: v1)" in out
    assert "tag raw@reviewed" in out
    shown = json.loads(data(capsys, registry, "show", "raw@prod", "--json")[1])
    assert sorted(shown["tags"]) == ["prod", "reviewed"] and shown["tags"]["prod"]["history"][0]["version"] == "v1"
    listed = json.loads(data(capsys, registry, "ls", "--json")[1])
    assert {row["ref"]: row["tags"] for row in listed} == {"raw@v1": [], "raw@v2": ["prod", "reviewed"],
                                                         "capfilt@v1": []}  # fmt: skip
    table = data(capsys, registry, "ls")[1].splitlines()
    assert table[0].split()[-1] == "TAGS" and any(line.startswith("raw@v2") and "prod,reviewed" in line
                                                  for line in table)  # fmt: skip
    code, _, err = data(capsys, registry, "show", "raw@staging")
    assert code != 0 and "'raw@staging' not found (versions of raw: v1, v2; tags: prod, reviewed)" in err


def test_a_tagged_version_is_not_removed_whole_until_the_tag_is_gone(registry, capsys):
    data(capsys, registry, "tag", "capfilt@v1", "prod")
    code, _, err = data(capsys, registry, "rm", "capfilt@v1", "--yes")
    assert code != 0 and "capfilt@v1 is tagged capfilt@prod" in err and "blip data untag capfilt@prod" in err
    assert data(capsys, registry, "rm", "capfilt@v1", "--data-only", "--yes")[0] == 0  # its data may go
    assert registry.resolve("capfilt@prod").version == "v1"
    code, out, _ = data(capsys, registry, "untag", "capfilt@prod")
    assert code == 0 and "it named capfilt@v1; the version stays" in out
    with pytest.raises(NotFoundError):
        registry.resolve("capfilt@prod")
    assert data(capsys, registry, "untag", "capfilt@prod")[2].strip().endswith("'capfilt' has no tag 'prod'")
    assert data(capsys, registry, "rm", "capfilt@v1", "--yes")[0] == 0


@pytest.mark.parametrize("tag", ["latest", "v3", "beef", "0123", "Prod", "-x", "", "a" * 65, "pro d"])
def test_a_tag_never_reads_as_a_version_or_an_id(tag):
    with pytest.raises(RegistryError, match="invalid tag"):
        check_tag(tag)


def test_tagging_what_does_not_exist_is_an_error(registry, tmp_path):
    with pytest.raises(NotFoundError):
        set_tag(registry, "raw@v9", "prod")
    publish_dataset(registry, tmp_path / "named", "raw", sample_rows(2), version="stable")
    with pytest.raises(RegistryError, match="raw@stable is a version's own name"):
        set_tag(registry, "raw@v1", "stable")
    assert check_tag("prod-2026.11_a") == "prod-2026.11_a"


def test_the_browser_shows_the_tags_as_they_move(tmp_path):
    from starlette.testclient import TestClient

    from datasets_manifests.browser.app import create_app

    registry = Registry(tmp_path / "registry")
    publish_dataset(registry, tmp_path / "raw1", "raw", sample_rows(3))
    publish_dataset(registry, tmp_path / "raw2", "raw", sample_rows(4))
    set_tag(registry, "raw@v1", "prod")
    client = TestClient(create_app(registry.url, thumb_cache_dir=tmp_path / "thumbs"))
    tags = lambda: {row["ref"]: row["tags"] for row in client.get("/api/versions").json()["versions"]}  # noqa: E731
    assert tags() == {"raw@v1": ["prod"], "raw@v2": []}
    set_tag(registry, "raw@v2", "prod")  # moved while the browser runs: the next request says so
    assert tags() == {"raw@v1": [], "raw@v2": ["prod"]}
    body = client.get("/api/versions/dataset/raw/v2").json()
    assert list(body["tags"]) == ["prod"] and body["tags"]["prod"]["history"][0]["version"] == "v1"
    assert client.get("/api/versions/dataset/raw/v1").json()["tags"] == {}
