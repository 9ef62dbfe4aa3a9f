"""`blip data publish-model`: BLIP's released captioner and filter (here tiny files in the layout of the released
ones, 64-dim heads as theirs) become model versions that CapFilt takes, with their source and sha256; the same
weights published again are the same version; bad sources are one-line errors."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from blip_models import checkpoints as ck
from blip_models.configuration_blip import preset
from datasets_manifests.registry import Registry
from pipelines.cli import main


@pytest.fixture
def released(tmp_path, monkeypatch):
    """The checkpoint cache holding the two files BLIP's CapFilt models are released as."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("BLIP_CHECKPOINT_CACHE", str(cache))
    config = preset("tiny").replace(vision={"width": 64, "heads": 1},
                                    text={"hidden_size": 64, "num_attention_heads": 1,
                                          "encoder_width": 64})  # fmt: skip
    states = {}
    for kind, file in (("caption", "model_base_caption_capfilt_large.pth"),
                       ("retrieval", "model_base_retrieval_coco.pth")):
        torch.manual_seed(len(states))
        states[kind] = ck.build_model(kind, config).state_dict()
        torch.save({"model": states[kind], "epoch": 5}, cache / file)
    return cache, states


def _publish(registry_dir, *args):
    return main(["data", "--registry", str(registry_dir), "publish-model", *args])


def test_the_released_captioner_and_filter_become_model_versions_capfilt_takes(released, tmp_path, capsys):
    from pipelines.tasks.capfilt import _model_source

    cache, states = released
    registry_dir = tmp_path / "registry"
    assert _publish(registry_dir, "model_base_caption_capfilt_large", "--name", "blip-captioner") == 0
    out = capsys.readouterr().out
    assert out.startswith("blip-captioner@v1  id ") and "a 'caption' model, ViT 2 x 64 at 32 px" in out
    assert "use: blip capfilt CONFIG --dataset REF --captioner blip-captioner@v1" in out
    assert _publish(registry_dir, str(cache / "model_base_retrieval_coco.pth"), "--name", "blip-filter",
                    "--kind", "itm", "--json") == 0  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert summary["ref"] == "blip-filter@v1" and summary["metadata"]["kind"] == "itm"

    registry = Registry(str(registry_dir))
    captioner, filter_model = registry.resolve("blip-captioner"), registry.resolve("blip-filter")
    assert captioner.metadata["source"] == {
        "checkpoint": "model_base_caption_capfilt_large", "format": "official",
        "sha256": hashlib.sha256((cache / "model_base_caption_capfilt_large.pth").read_bytes()).hexdigest()}
    assert "momentum/queue" in filter_model.metadata["load"]  # the retrieval file's training state, left out
    loaded = ck.from_pretrained(registry.local_path(captioner, "config.json").parent)
    for key, value in loaded.state_dict().items():
        torch.testing.assert_close(value, states["caption"][key], rtol=0, atol=0)
    assert _model_source(registry, captioner, ("caption",))["kind"] == "caption"
    assert _model_source(registry, filter_model, ("itm", "retrieval"))["kind"] == "itm"

    # The same weights as the same kind are the same version: by name, by path (its kind told by its tensors)
    # and with the kind it is named.
    path = str(cache / "model_base_caption_capfilt_large.pth")
    for args in (("model_base_caption_capfilt_large",), (path,), (path, "--kind", "caption")):
        assert _publish(registry_dir, *args, "--name", "blip-captioner") == 0
        assert capsys.readouterr().out.startswith("blip-captioner@v1 ")
    assert [m.ref for m in registry.versions("model", "blip-captioner")] == ["blip-captioner@v1"]
    assert not any(registry.work_base().iterdir())  # nothing left in the work dir


def test_bad_sources_are_one_line(released, tmp_path, capsys):
    registry_dir = tmp_path / "registry"
    assert _publish(registry_dir, "model_base_caption_capfilt_larg", "--name", "x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did you mean model_base_caption_capfilt_large" in err[0]
    assert _publish(registry_dir, "model_base_caption_capfilt_large", "--name", "x", "--kind", "itm") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a 'caption' checkpoint lacks" in err[0] and "'itm' model needs" in err[0]


def test_the_flow_takes_a_given_captioner_and_filter_as_versions_or_checkpoints(released, tmp_path,
                                                                                stages_without_prefect):
    """`capfilt_models` in a pipeline preset: a model version of the registry is used as it is; a checkpoint
    (here BLIP's filter by name) is published as `<name>-filter-given`, a 'retrieval' model as the pair the recipe
    finetunes; a second run publishes nothing new."""
    from pipelines.flows.bootstrap import given_pair
    from pipelines.pipeline_config import load_pipeline

    registry_dir = tmp_path / "registry"
    assert _publish(registry_dir, "model_base_caption_capfilt_large", "--name", "my-captioner") == 0
    cfg = load_pipeline("tiny", [f"registry={registry_dir}", "capfilt_models.captioner=my-captioner@v1",
                                 "capfilt_models.filter=model_base_retrieval_coco"])  # fmt: skip
    registry = Registry(str(registry_dir))
    captioner, filter_model = given_pair(cfg, registry)
    assert captioner.ref == "my-captioner@v1"
    assert filter_model.ref == "tiny-filter-given@v1" and filter_model.metadata["kind"] == "retrieval"
    assert filter_model.metadata["source"]["checkpoint"] == "model_base_retrieval_coco"
    logged = stages_without_prefect[0]
    published = [line.split(" (")[0] for line in logged if line.startswith("publish-")]
    assert published == ["publish-filter -> tiny-filter-given@v1"]
    assert given_pair(cfg, Registry(str(registry_dir))) == (captioner, filter_model)
    assert [m.ref for m in registry.versions("model", "tiny-filter-given")] == ["tiny-filter-given@v1"]


def test_blip_infer_runs_a_model_version_of_the_registry(released, tmp_path, capsys):
    from PIL import Image

    cache, _ = released
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp_path / "red.png")
    registry_dir = tmp_path / "registry"
    assert _publish(registry_dir, "model_base_caption_capfilt_large", "--name", "blip-captioner") == 0
    capsys.readouterr()
    args = ["--image", str(tmp_path / "red.png"), "--max-length", "8", "--json"]
    assert main(["infer", "caption", "--checkpoint", str(cache / "model_base_caption_capfilt_large.pth"), *args]) == 0
    by_file = capsys.readouterr().out
    assert main(["infer", "caption", "--checkpoint", "blip-captioner@v1", "--registry", str(registry_dir), *args]) == 0
    assert capsys.readouterr().out == by_file
    assert main(["infer", "caption", "--checkpoint", "no-such-model", "--registry", str(registry_dir), *args]) == 2
    assert capsys.readouterr().err.strip() == (f"blip infer: error: checkpoint not found: no-such-model, nor a model "
                                               f"version of {registry_dir}; `blip infer models` lists the checkpoint "
                                               "names")  # fmt: skip


def test_blip_capfilt_publishes_checkpoints_given_as_its_models(released, tmp_path, capsys):
    """`blip capfilt … --captioner model_base_caption_capfilt_large --filter model_base_retrieval_coco`: both
    published first (as `<checkpoint>-captioner` / `-filter`, a 'caption' and a 'retrieval' model), then the
    stage's own checks run (here: an input with no shards, refused before Ray)."""
    from datasets_manifests.manifest import Producer

    registry = Registry(str(tmp_path / "registry"))
    (tmp_path / "empty").mkdir()
    registry.publish(kind="dataset", name="web", staging_dir=tmp_path / "empty", files=[], producer=Producer(stage="t"))
    assert main(["capfilt", "tiny", "--dataset", "web", "--captioner", "model_base_caption_capfilt_large",
                 "--filter", "model_base_retrieval_coco", "--registry", registry.url]) == 2  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    assert err[:2] == ["captioner: model_base_caption_capfilt_large -> model_base_caption_capfilt_large-captioner@v1",
                       "filter: model_base_retrieval_coco -> model_base_retrieval_coco-filter@v1"]  # fmt: skip
    assert err[2].startswith("blip capfilt: error:") and "has no shards to caption" in err[2]
    assert registry.resolve("model_base_retrieval_coco-filter").metadata["kind"] == "retrieval"


def test_a_weights_digest_is_remembered_until_the_file_changes(tmp_path, monkeypatch):
    """`file_sha256` remembers a checkpoint's sha256 in the cache under its path, size, mtime and inode (a ~1 GB
    file is not read again by every evaluation); a file written anew is hashed anew."""
    from pipelines.tasks.publish_model import file_sha256

    monkeypatch.setenv("BLIP_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"a" * 1000)
    assert file_sha256(weights) == hashlib.sha256(b"a" * 1000).hexdigest()
    (memo,) = (tmp_path / "cache" / "sha256").iterdir()
    remembered = json.loads(memo.read_text())
    memo.write_text(json.dumps({**remembered, "sha256": "f" * 64}))
    assert file_sha256(weights) == "f" * 64  # read from the memo, not the file
    replacement = tmp_path / "new.pth"
    replacement.write_bytes(b"b" * 1000)
    replacement.replace(weights)  # the same size at the same path
    assert file_sha256(weights) == hashlib.sha256(b"b" * 1000).hexdigest()
    memo.write_text("{broken")
    assert file_sha256(weights) == hashlib.sha256(b"b" * 1000).hexdigest()


def test_a_model_version_exports_for_transformers_and_for_blips_code(released, tmp_path, capsys):
    """`blip data export-model`: a transformers directory that transformers' own classes load (its BlipProcessor
    giving our eval transform's pixels and prompt tokens, its model the same caption tokens), or BLIP's `.pth`
    layout, which loads back bit-equal; a pretraining model names the kinds it can go to; nothing is overwritten."""
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from blip_models.inference import load_for
    from blip_models.processing import eval_transform

    registry_dir = tmp_path / "registry"
    assert _publish(registry_dir, "model_base_caption_capfilt_large", "--name", "blip-captioner") == 0
    capsys.readouterr()
    assert main(["data", "--registry", str(registry_dir), "show", "blip-captioner"]) == 0
    assert "export-model blip-captioner@v1 --out blip-captioner-hf [--format blip-pth]" in capsys.readouterr().out
    export = ["data", "--registry", str(registry_dir), "export-model", "blip-captioner"]
    assert main([*export, "--out", str(tmp_path / "hf")]) == 0
    assert "wrote the 'caption' model blip-captioner to" in capsys.readouterr().out
    version = Registry(str(registry_dir)).resolve("blip-captioner")
    ours = ck.from_pretrained(Registry(str(registry_dir)).local_path(version, "config.json").parent).eval()

    processor = BlipProcessor.from_pretrained(tmp_path / "hf")
    hf = BlipForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    image = Image.new("RGB", (50, 40), (200, 30, 30))
    inputs = processor(images=image, text="a picture of ", return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"][0], eval_transform(32)(image), atol=1e-5, rtol=0)
    prompt_ids = inputs["input_ids"][:, :-1].clone()
    prompt_ids[:, 0] = ours.config.text.bos_token_id
    with torch.no_grad():
        ours_ids = ours.generate_ids(inputs["pixel_values"], prompt_ids, num_beams=3, max_length=12, min_length=5)
        hf_ids = hf.generate(**inputs, num_beams=3, max_length=12, min_length=5, do_sample=False)
    assert ours_ids.tolist() == hf_ids.tolist()
    for key, value in load_for(str(tmp_path / "hf"), None).model.state_dict().items():  # and back: the same weights
        torch.testing.assert_close(value, ours.state_dict()[key], rtol=0, atol=0)

    assert main([*export, "--out", str(tmp_path / "blip.pth"), "--format", "blip-pth"]) == 0
    capsys.readouterr()
    assert set(torch.load(tmp_path / "blip.pth", weights_only=True)) == {"model"}
    reloaded, _ = ck.load_official(tmp_path / "blip.pth")
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, ours.state_dict()[key], rtol=0, atol=0)

    assert main([*export, "--out", str(tmp_path / "blip.pth"), "--format", "blip-pth"]) == 2
    assert "blip.pth exists: remove it or choose another --out" in capsys.readouterr().err
    pretrain = tmp_path / "pretrain"
    ck.save_pretrained(ck.build_model("pretrain", preset("tiny")), pretrain)
    assert main([*export[:-1], str(pretrain), "--out", str(tmp_path / "hf-pretrain")]) == 2
    assert "(a pretraining model: --kind caption or --kind itm)" in capsys.readouterr().err
    assert main([*export[:-1], str(pretrain), "--out", str(tmp_path / "hf-itm"), "--kind", "itm", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kind"] == "itm"
    assert not list(tmp_path.glob("*.partial-*"))
