"""`blip data rm`: whole versions and data files out of a local and a memory:// registry, never cutting the
lineage of what stays, recorded before anything is deleted, finished by a rerun."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets_manifests.ops import verify
from datasets_manifests.registry import DataRemovedError, NotFoundError, Registry, VersionExistsError
from datasets_manifests.removal import RemovalRefused, plan_removals, remove
from pipelines.cli import main

from datasets_fixtures import memory_url, publish_dataset, sample_rows

SHARD = "shards/train-000000.tar"


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> Registry:
    """raw@v1 (cache key 'raw-key') -> capfilt@v1."""
    registry = Registry(tmp_path / "registry" if request.param == "local" else memory_url())
    raw = publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(6), stage="download", cache_key="raw-key")
    publish_dataset(registry, tmp_path / "cf", "capfilt", sample_rows(6, captions={1: "a new caption"}),
                    parents=(raw,), stage="capfilt")  # fmt: skip
    return registry


def rm(capsys, registry: Registry, *args: str) -> tuple[int, str, str]:
    code = main(["data", "--registry", registry.url, "rm", *args])
    out, err = capsys.readouterr()
    return code, out, err


def exists(registry: Registry, manifest, relpath: str) -> bool:
    return registry.fs.exists(f"{registry.version_path(manifest.kind, manifest.name, manifest.version)}/{relpath}")


def test_a_parent_is_removed_whole_only_with_the_versions_made_from_it(registry, capsys, tmp_path):
    raw = registry.resolve("raw@v1")
    code, _, err = rm(capsys, registry, "raw@v1", "--yes")
    assert code != 0 and "raw@v1 is a parent of capfilt@v1" in err and "--data-only" in err
    assert exists(registry, raw, SHARD)  # refused: nothing removed
    code, out, _ = rm(capsys, registry, "raw@v1", "capfilt@v1", "--yes")
    assert code == 0
    assert out.index("removed capfilt@v1") < out.index("removed raw@v1")  # children first
    assert "whole" in out and registry.list() == []
    assert not exists(registry, raw, SHARD) and not exists(registry, raw, "manifest.json")
    with pytest.raises(NotFoundError, match=r"raw@v1 was removed from .* on \d{4}-"):
        registry.resolve("raw@v1")
    with pytest.raises(NotFoundError, match="every version of 'raw' was removed"):
        registry.resolve("raw")
    # A removed version's name is never given again, not even by an explicit publish.
    again = publish_dataset(registry, tmp_path / "raw2", "raw", sample_rows(6), stage="download")
    assert again.version == "v2"
    with pytest.raises(VersionExistsError, match="not given again"):
        publish_dataset(registry, tmp_path / "raw3", "raw", sample_rows(5), stage="download", version="v1")


def test_data_only_frees_the_shards_and_keeps_the_record_index_and_lineage(registry, capsys, tmp_path):
    raw = registry.resolve("raw@v1")
    shard_bytes = raw.file(SHARD).bytes
    code, out, _ = rm(capsys, registry, "raw@v1", "--data-only", "--dry-run")
    assert code == 0 and "would remove raw@v1 (dataset, its data files): 1 files" in out and "nothing removed" in out
    if registry.is_local:  # a file another version hard-links (a takedown's unchanged shards) is not freed
        link = Path(registry.root, "linked.tar")
        link.hardlink_to(registry.local_path(raw, SHARD))
        code, out, _ = rm(capsys, registry, "raw@v1", "--data-only", "--dry-run")
        assert "of it stays: hard links of another version" in out and "0 B freed in all" in out
        link.unlink()
    assert exists(registry, raw, SHARD)
    code, out, _ = rm(capsys, registry, "raw@v1", "--data-only", "--yes", "--json")
    assert code == 0
    assert json.loads(out)["removals"] == [{"ref": "raw@v1", "kind": "dataset", "id": raw.id, "what": "data",
                                            "files": 1, "bytes": shard_bytes, "shared_bytes": 0,
                                            "scrub": None}]  # fmt: skip
    assert not exists(registry, raw, SHARD) and exists(registry, raw, "index.parquet")
    assert registry.resolve("raw@v1") == raw  # still listed, lineage whole
    assert [m.ref for m in registry.children(raw)] == ["capfilt@v1"]

    main(["data", "--registry", registry.url, "ls"])
    listed = capsys.readouterr().out
    assert any(line.startswith("raw@v1") and "data removed" in line for line in listed.splitlines())
    assert any(line.startswith("capfilt@v1") and "data removed" not in line for line in listed.splitlines())
    main(["data", "--registry", registry.url, "show", "raw@v1"])
    assert "data files removed on" in capsys.readouterr().out
    main(["data", "--registry", registry.url, "lineage", "capfilt@v1"])
    assert any("raw@v1" in line and "(data removed)" in line for line in capsys.readouterr().out.splitlines())
    main(["data", "--registry", registry.url, "samples", "raw@v1", "--n", "2"])
    assert "s000000" in capsys.readouterr().out  # the index still answers
    main(["data", "--registry", registry.url, "find", "--key", "s000000"])
    assert any(line.startswith("raw@v1  s000000") and line.endswith("its data files were removed")
               for line in capsys.readouterr().out.splitlines())  # fmt: skip
    assert verify(registry, raw) == []  # what stays is checked; the removed shard is not damage
    main(["data", "--registry", registry.url, "verify", "raw@v1"])
    assert "1 data files removed by `blip data rm`, not checked" in capsys.readouterr().out

    # A stage refuses to read it, naming the removal; a rerun of the stage that made it publishes anew.
    assert "removed by `blip data rm` on" in registry.absent(raw, raw.shards())[SHARD]
    with pytest.raises(DataRemovedError, match=r"raw@v1: shards/train-000000.tar was removed on .*another name"):
        registry.url_of(raw, SHARD)  # every read of a version's file goes through path_of
    registry.open(raw, "index.parquet").close()
    # A rerun of the stage that made it reuses the record: capfilt@v1, made from it, stays cached.
    assert registry.find_cached("dataset", "raw", "raw-key") == raw
    with pytest.raises(VersionExistsError, match="data files were removed"):
        publish_dataset(registry, tmp_path / "again", "raw", sample_rows(6), stage="download", cache_key="raw-key",
                        version="v1")  # fmt: skip

    # Again: nothing left to free. Whole, afterwards: still refused while capfilt@v1 is kept.
    code, out, _ = rm(capsys, registry, "raw@v1", "--data-only", "--yes")
    assert code == 0 and "0 files, 0 B" in out
    assert registry.removal(raw)["files"] == [SHARD] and registry.removal(raw)["bytes"] == shard_bytes
    with pytest.raises(RemovalRefused, match="is a parent of capfilt@v1"):
        plan_removals(registry, ["raw@v1"], data_only=False)


def test_a_removal_stopped_half_way_is_finished_by_a_rerun(registry, capsys, monkeypatch):
    capfilt = registry.resolve("capfilt@v1")
    (removal,) = plan_removals(registry, ["capfilt@v1"], data_only=False)

    def killed(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        if registry.is_local:  # killed while emptying `.removing/`, after the rename
            patch.setattr("datasets_manifests.removal.shutil.rmtree", killed)
        patch.setattr("datasets_manifests.removal.DELETE_BATCH", 1)
        remove(registry, removal, on_files=killed)  # on a store: after the first file, the index still there
    if registry.is_local:
        assert list(Path(registry.root, ".removing").iterdir())
    else:  # the manifest went first: no reader sees a half-removed version
        assert registry.versions("dataset", "capfilt") == []
        assert exists(registry, capfilt, "index.parquet") and not exists(registry, capfilt, SHARD)
        main(["data", "--registry", registry.url, "work"])
        listed = capsys.readouterr().out
        assert "a removal of capfilt@v1" in listed and "the next `blip data rm` finishes it" in listed
    with pytest.raises(NotFoundError, match="was removed"):
        registry.resolve("capfilt@v1")
    _, _, err = rm(capsys, registry, "raw@v1", "--yes")  # capfilt@v1 is gone: raw@v1 may go whole
    assert "finished an earlier removal stopped half-way" in err
    assert registry.list() == []
    leftovers = [path for path in registry.fs.find(registry.root) if "/.removed/" not in path]
    assert leftovers == [], leftovers  # the local `.removing/` and the store's folder emptied too
    assert not exists(registry, capfilt, SHARD)


def test_refused_while_an_unfinished_run_reads_it_and_without_yes_off_a_terminal(registry, capsys, monkeypatch):
    raw = registry.resolve("raw@v1")
    work = registry.note_work("shard-key", stage="shard", name="train", parents=[raw])
    (work / "part-0.parquet").write_bytes(b"half")
    refused = r"read by the unfinished run shard-key \(shard → train\).*work --remove"
    with pytest.raises(RemovalRefused, match=refused):
        plan_removals(registry, ["raw@v1"], data_only=True)
    registry.remove_work("shard-key")
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    code, _, err = rm(capsys, registry, "raw@v1", "--data-only")
    assert code != 0 and "pass --yes" in err
    assert exists(registry, raw, SHARD)


def test_data_only_needs_data_files(tmp_path):
    registry = Registry(tmp_path / "registry")
    staging = tmp_path / "eval"
    staging.mkdir()
    (staging / "metrics.json").write_text("{}")
    from datasets_manifests.manifest import Producer

    registry.publish(kind="evaluation", name="ev", staging_dir=staging, producer=Producer(stage="evaluate"),
                     files=[{"path": "metrics.json", "role": "metrics"}])  # fmt: skip
    with pytest.raises(RemovalRefused, match="no data files"):
        plan_removals(registry, ["ev@v1"], data_only=True)
    (removal,) = plan_removals(registry, ["ev@v1"], data_only=False)
    remove(registry, removal)
    assert registry.list() == [] and not Path(registry.root, "evaluations", "ev").exists()


def test_the_browser_says_the_data_files_were_removed(tmp_path):
    from starlette.testclient import TestClient

    from datasets_manifests.browser.app import create_app

    registry = Registry(tmp_path / "registry")
    raw = publish_dataset(registry, tmp_path / "raw", "raw", sample_rows(3), stage="download")
    for removal in plan_removals(registry, ["raw@v1"], data_only=True):
        remove(registry, removal)
    client = TestClient(create_app(registry.url, thumb_cache_dir=tmp_path / "thumbs"))
    listed = {row["ref"]: row["data_removed"] for row in client.get("/api/versions").json()["versions"]}
    assert listed == {"raw@v1": True}
    body = client.get("/api/versions/dataset/raw/v1").json()
    assert body["data_removed"]["files"] == [SHARD] and body["data_removed"]["what"] == "data"
    rows = client.get("/api/versions/dataset/raw/v1/samples").json()["samples"]  # the index still answers
    thumb = client.get(rows[0]["thumb"])
    assert thumb.status_code == 410 and "blip data rm --data-only" in thumb.json()["error"]
    assert raw.ref in thumb.json()["error"]
