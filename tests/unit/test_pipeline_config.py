"""Pipeline presets: every preset loads, and a bad value fails before any stage starts, naming the key."""

from __future__ import annotations

import pytest

from pipelines.cli import main
from pipelines.config import ConfigError
from pipelines.pipeline_config import PRESETS, load_pipeline


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load(preset):
    cfg = load_pipeline(preset)
    assert cfg.finetune_captioner.task == "caption"
    assert cfg.finetune_filter.task == "retrieval"
    assert cfg.version_name("web") == f"{cfg.name}-web"


def test_large_presets_use_gpus_and_shared_storage():
    for preset in ("14m", "129m"):
        cfg = load_pipeline(preset)
        assert cfg.pretrain.scaling.use_gpu and cfg.pretrain.scaling.storage_path.startswith("s3://")
        assert cfg.capfilt.compute.device == "cuda"
        assert cfg.download.distributor == "ray"


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("pretrain.optim.lr=-1", "lr"),
        ("capfilt.filter.treshold=0.6", "capfilt.filter.treshold"),
        ("shard.samples_per_shard=zero", "shard.samples_per_shard"),
        ("finetune_captioner.task=retrieval", "finetune_captioner.task"),
    ],
)
def test_invalid_value_names_the_key(override, named):
    with pytest.raises(ConfigError) as error:
        load_pipeline("tiny", [override])
    assert named in str(error.value)


def test_flow_fails_before_any_stage(tmp_path, capsys):
    from pipelines.flows.bootstrap import bootstrap

    registry = tmp_path / "registry"
    with pytest.raises(ConfigError, match="pretrain.optim"):
        bootstrap.fn(preset="tiny", overrides=[f"registry={registry}", "pretrain.optim.weight_decay=-0.5"])
    assert not registry.exists() or not any(registry.iterdir())
    # The CLI says the same in one line, exit code 2, before Prefect starts.
    assert main(["flow", "run", "tiny", "--set", f"registry={registry}", "--set", "pretrain.loop.epochs=0"]) == 2
    err = capsys.readouterr().err
    assert "pretrain.loop" in err and "epochs" in err


def test_flow_validate_cli(capsys):
    assert main(["flow", "validate", "tiny"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["flow", "validate", "tiny", "--set", "download.procesess=4"]) == 2
    assert "download.procesess" in capsys.readouterr().err
