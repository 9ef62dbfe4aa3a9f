"""`blip data verify` catches a truncated shard (a copy cut short by a full disk or a killed upload)."""

from __future__ import annotations

import pytest

from datasets_fixtures import memory_url, publish_dataset, sample_rows
from datasets_manifests.registry import Registry
from pipelines.cli import main

SHARD = "shards/train-000000.tar"


@pytest.mark.parametrize("where", ["local", "memory"])
def test_verify_names_a_truncated_shard(where, tmp_path, capsys):
    registry = Registry(tmp_path / "registry" if where == "local" else memory_url())
    manifest = publish_dataset(registry, tmp_path / "stage", "raw", sample_rows(6), stage="download")
    assert main(["data", "--registry", registry.url, "verify", "raw@v1"]) == 0
    capsys.readouterr()
    path = registry.path_of(manifest, SHARD)
    size = registry.fs.size(path)
    with registry.fs.open(path, "rb") as handle:
        head = handle.read(size // 2)
    with registry.fs.open(path, "wb") as handle:  # the registry opens read-only; tamper through the filesystem
        handle.write(head)
    assert main(["data", "--registry", registry.url, "verify", "raw@v1"]) == 1
    err = capsys.readouterr().err
    assert SHARD in err and "index.parquet" not in err  # the bad file is named, and only it
