"""Pipeline presets: every preset loads, and a bad value fails before any stage starts, naming the key."""

from __future__ import annotations

import re

import pytest

from pipelines.cli import main
from pipelines.config import CONFIG_DIR, ConfigError, load_config
from pipelines.pipeline_config import PRESETS, load_pipeline
from pipelines.tasks.download import DownloadConfig


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
        # Ray shard tasks run on every node: their output must be storage the driver sees too.
        assert cfg.download.output_folder.startswith("s3://")


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


def test_a_float_in_exponent_notation_without_a_point_is_a_float(tmp_path):
    """YAML 1.1 (PyYAML) reads `1e-4` as text: `--set pretrain.optim.lr=1e-4` (and `lr: 1e-4` in a file, as
    learning rates are written) failed with "expected float, got '1e-4'"."""
    assert load_pipeline("tiny", ["pretrain.optim.lr=1e-4", "pretrain.optim.min_lr=5E-7"]).pretrain.optim.lr == 1e-4
    assert load_pipeline("tiny", ["pretrain.optim.min_lr=5E-7"]).pretrain.optim.min_lr == 5e-7
    with pytest.raises(ConfigError, match="expected int, got '1e3'"):  # an int field still wants an int
        load_pipeline("tiny", ["shard.samples_per_shard=1e3"])


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


def test_bad_set_value_blames_the_override_not_the_file(tmp_path, capsys):
    args = ["download", str(tmp_path / "list.json"), "--name", "raw", "--registry", str(tmp_path / "r")]
    assert main([*args, "--set", "image_size=big"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("blip download: error: --set image_size=big (applied to ")
    assert "key 'image_size' expected int, got 'big'" in err
    for override, detail in (("threads=0", "'threads' = 0 is out of range"), ("thread=4", "unknown key 'thread'")):
        with pytest.raises(ConfigError, match=rf"^--set {override} \(applied to .*default.yaml\): .*{detail}"):
            load_config(DownloadConfig, CONFIG_DIR / "download" / "default.yaml", [override])
    # A bad value in the file itself still names the file.
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_size: big\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(bad))}: key 'image_size' expected int"):
        load_config(DownloadConfig, bad, ["threads=4"])
    # Nested: the override of a whole mapping is blamed for a bad key inside it.
    with pytest.raises(ConfigError, match=r"^--set pretrain.optim=\{lr: x\} .*pretrain.optim.lr"):
        load_pipeline("tiny", ["pretrain.optim={lr: x}"])


def test_only_errors_that_may_not_happen_again_are_retried():
    """A stage is retried on network blips and lost Ray workers; not on a server's answer about the request (an
    HTTP 404 or 401: a missing file, no access) nor on CUDA running out of memory, which repeat."""
    import urllib.error

    import ray.exceptions
    import requests
    import torch

    from pipelines.flows.stages import is_transient

    def http(code: int) -> urllib.error.HTTPError:
        return urllib.error.HTTPError("http://h/x", code, "", {}, None)  # type: ignore[arg-type]

    def answered(status: int) -> requests.HTTPError:
        response = requests.Response()
        response.status_code = status
        return requests.HTTPError(response=response)

    assert is_transient(ConnectionResetError()) and is_transient(http(503)) and is_transient(http(429))
    assert is_transient(answered(502)) and is_transient(ray.exceptions.OutOfMemoryError("node memory"))
    assert not is_transient(http(404)) and not is_transient(answered(401)) and not is_transient(answered(403))
    assert not is_transient(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert not is_transient(ValueError("bad input")) and not is_transient(None)


def test_submit_says_where_a_job_without_a_registry_publishes(capsys, monkeypatch):
    """A flow submitted without a registry (tiny's `registry: null`, no BLIP_REGISTRY) publishes into the job's
    uploaded copy of the project, gone with it: said before the upload."""
    from pipelines.commands.orchestrate import check_job_target

    monkeypatch.delenv("BLIP_REGISTRY", raising=False)
    check_job_target("tiny", None, [])
    assert "no registry is set" in capsys.readouterr().err
    monkeypatch.setenv("BLIP_REGISTRY", "s3://bucket/registry")
    check_job_target("tiny", None, [])
    check_job_target("tiny", None, ["registry=s3://bucket/other"])
    assert capsys.readouterr().err == ""


def test_the_shells_registry_goes_with_a_submitted_job(tmp_path, monkeypatch):
    """BLIP_REGISTRY reaches the job (a relative path made absolute: the job runs in the uploaded copy)."""
    from pipelines.commands.orchestrate import job_runtime_env

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BLIP_REGISTRY", "artifacts/registry")
    assert job_runtime_env([])["env_vars"]["BLIP_REGISTRY"] == str(tmp_path / "artifacts/registry")
    monkeypatch.setenv("BLIP_REGISTRY", "s3://bucket/registry")
    assert job_runtime_env(["BLIP_REGISTRY=s3://other/r"])["env_vars"]["BLIP_REGISTRY"] == "s3://other/r"
    with pytest.raises(Exception, match="must look like KEY=VALUE"):
        job_runtime_env(["NOVALUE"])
