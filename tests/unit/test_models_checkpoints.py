"""Checkpoint I/O: official `.pth` layout (round trip, kind and architecture inference, shape errors, pos_embed
interpolation, momentum/queue handling, NLVR branch duplication) and our save_pretrained/from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch

from blip_models import checkpoints as ck
from blip_models.configuration_blip import preset

TINY_HEADS = {"vision_heads": 2, "text_heads": 4}  # tiny widths are not multiples of 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine is shared: one intra-op thread is much faster than two contended ones for tiny models.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny():
    return preset("tiny")


def _model(kind, config, seed=0):
    torch.manual_seed(seed)
    return ck.build_model(kind, config).eval()


def _save_pth(path, state_dict, **extra):
    torch.save({"model": dict(state_dict), **extra}, path)
    return path


def _inputs(config, batch=2, size=None):
    torch.manual_seed(1)
    size = size or config.vision.image_size
    pixels = torch.randn(batch, 3, size, size)
    input_ids = torch.tensor([[101, 1037, 3899, 2006, 1037, 102], [101, 2048, 8870, 102, 0, 0]])[:batch]
    return pixels, input_ids, (input_ids != 0).long()


def test_official_urls_cover_the_released_files():
    urls = ck.official_urls()
    assert len(urls) == 13
    assert urls["model_base_capfilt_large"] == (
        "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/model_base_capfilt_large.pth"
    )
    assert all(url.endswith(".pth") for url in urls.values())


@pytest.mark.parametrize("kind", ["pretrain", "retrieval", "itm", "caption", "vqa", "nlvr", "features"])
def test_kind_is_inferred_from_key_families(tiny, kind):
    assert ck.infer_kind(_model(kind, tiny).state_dict()) == kind


def test_architecture_is_read_from_shapes(tiny):
    arch = ck.infer_architecture(_model("pretrain", tiny).state_dict(), **TINY_HEADS)
    assert arch["vision"] == {"image_size": 32, "patch_size": 8, "width": 32, "depth": 2, "heads": 2, "mlp_ratio": 4.0}
    assert arch["text"]["hidden_size"] == 32 and arch["text"]["num_hidden_layers"] == 2
    assert arch["text"]["vocab_size"] == 30524 and arch["text"]["intermediate_size"] == 64
    assert arch["embed_dim"] == 16 and arch["queue_size"] == tiny.queue_size
    with pytest.raises(ck.CheckpointError, match="multiple of 64"):
        ck.infer_architecture(_model("caption", tiny).state_dict())  # heads cannot be guessed for width 32


def test_official_round_trip_caption_gives_identical_outputs(tiny, tmp_path):
    model = _model("caption", tiny)
    path = _save_pth(tmp_path / "caption.pth", model.state_dict(), epoch=3)
    loaded, report = ck.load_official(path, **TINY_HEADS)
    assert report.kind == "caption" and report.ok and not report.unexpected
    pixels, input_ids, mask = _inputs(tiny)
    with torch.no_grad():
        expected, actual = model(pixels, input_ids, mask), loaded(pixels, input_ids, mask)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=0)
    # The LM head stays tied to the word embeddings after loading.
    assert loaded.text_decoder.cls.predictions.decoder.weight is loaded.text_decoder.bert.embeddings.word_embeddings.weight


def test_official_round_trip_itm_from_retrieval_ignores_momentum_and_queues(tiny, tmp_path):
    source = _model("retrieval", tiny)
    path = _save_pth(tmp_path / "retrieval.pth", source.state_dict())
    itm, report = ck.load_official(path, kind="itm", **TINY_HEADS)
    assert {"image_queue", "temp"} <= set(report.ignored_training_state) and not report.unexpected
    assert any(k.startswith("visual_encoder_m.") for k in report.ignored_training_state)
    pixels, input_ids, mask = _inputs(tiny)
    with torch.no_grad():
        image_embeds = source.visual_encoder(pixels)
        torch.testing.assert_close(itm.itm_logits(image_embeds, input_ids, mask),
                                   source.itm_logits(image_embeds, input_ids, mask), rtol=0, atol=0)  # fmt: skip


def test_pretrain_into_retrieval_loads_momentum_and_initialises_missing_queues(tiny, tmp_path):
    source = _model("pretrain", tiny)
    with torch.no_grad():
        source.visual_encoder_m.cls_token.add_(1.0)  # momentum differs from online: must come from the file
    path = _save_pth(tmp_path / "pretrain.pth", source.state_dict())
    retrieval, report = ck.load_official(path, kind="retrieval", **TINY_HEADS)
    torch.testing.assert_close(retrieval.visual_encoder_m.cls_token, source.visual_encoder_m.cls_token)
    torch.testing.assert_close(retrieval.image_queue, source.image_queue)
    assert set(report.initialized) >= {"idx_queue", "ptr_queue"}  # retrieval-only buffers
    assert any(k.startswith("text_decoder.") for k in report.unexpected)  # no decoder in retrieval


def test_wrong_shape_is_an_error_naming_key_and_shapes(tiny, tmp_path):
    state = dict(_model("itm", tiny).state_dict())
    state["itm_head.weight"] = torch.zeros(3, 32)
    path = _save_pth(tmp_path / "bad.pth", state)
    with pytest.raises(ck.CheckpointError, match=r"itm_head\.weight: checkpoint \[3, 32\] vs model \[2, 32\]"):
        ck.load_official(path, **TINY_HEADS)


def test_wrong_kind_is_an_error_naming_both_kinds(tiny, tmp_path):
    path = _save_pth(tmp_path / "caption.pth", _model("caption", tiny).state_dict())
    with pytest.raises(ck.CheckpointError, match="'caption' checkpoint lacks .* 'itm' model needs"):
        ck.load_official(path, kind="itm", **TINY_HEADS)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ck.CheckpointError, match="not a readable torch checkpoint"):
        ck.load_official(junk)
    other = _save_pth(tmp_path / "other.pth", {"encoder.weight": torch.zeros(2)})
    with pytest.raises(ck.CheckpointError, match="no 'visual_encoder"):
        ck.load_official(other)


def test_pos_embed_is_interpolated_for_another_image_size(tiny, tmp_path):
    model = _model("features", tiny)
    path = _save_pth(tmp_path / "features.pth", model.state_dict())
    loaded, report = ck.load_official(path, image_size=48, **TINY_HEADS)
    assert loaded.config.vision.image_size == 48
    assert any("pos_embed: interpolated [1, 17, 32] -> [1, 37, 32]" in line for line in report.adapted)
    new_pos, old_pos = loaded.visual_encoder.pos_embed, model.visual_encoder.pos_embed
    torch.testing.assert_close(new_pos[:, :1], old_pos[:, :1], rtol=0, atol=0)  # CLS position kept
    grid = old_pos[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(new_pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 36, 32))
    pixels, _, _ = _inputs(tiny, size=48)
    with torch.no_grad():
        assert loaded(pixels, mode="image").image_embeds.shape == (2, 37, 32)


def test_pretrained_checkpoint_into_nlvr_duplicates_cross_attention(tiny, tmp_path):
    source = _model("pretrain", tiny)
    path = _save_pth(tmp_path / "pretrain.pth", source.state_dict())
    nlvr, report = ck.load_official(path, kind="nlvr", **TINY_HEADS)
    layer, src = nlvr.text_encoder.encoder.layer[1], source.text_encoder.encoder.layer[1]
    for branch in (layer.crossattention.self0, layer.crossattention.self1):
        torch.testing.assert_close(branch.query.weight, src.crossattention.self.query.weight, rtol=0, atol=0)
    for dense in (layer.crossattention.output.dense0, layer.crossattention.output.dense1):
        torch.testing.assert_close(dense.weight, src.crossattention.output.dense.weight, rtol=0, atol=0)
    assert any("NLVR branches" in line for line in report.adapted)
    assert any(k.startswith("cls_head.") for k in report.initialized)
    assert any(".merge_layer." in k for k in report.initialized)  # layers >= depth/2 merge: fresh, as reference


def test_official_decoder_bias_alias_is_accepted(tiny, tmp_path):
    state = dict(_model("caption", tiny).state_dict())
    # transformers-4.15 BERT LM heads store the bias twice (`bias` and `decoder.bias`), as the released files do.
    state["text_decoder.cls.predictions.decoder.bias"] = state["text_decoder.cls.predictions.bias"]
    state["text_decoder.bert.embeddings.position_ids"] = torch.arange(64)[None]
    _, report = ck.load_official(_save_pth(tmp_path / "c.pth", state), **TINY_HEADS)
    assert report.ok and not report.unexpected


@pytest.mark.parametrize("kind", ["pretrain", "caption", "vqa"])
def test_save_and_from_pretrained_round_trip_with_tied_weights(tiny, tmp_path, kind):
    model = _model(kind, tiny)
    directory = ck.save_pretrained(model, tmp_path / kind)
    config = json.loads((directory / "config.json").read_text())
    assert config["kind"] == kind and config["format"] == ck.FORMAT_NAME
    assert "text_decoder.cls.predictions.decoder.weight" in config["tied"]  # LM head tied to the embeddings
    if kind == "pretrain":  # encoder shares everything but self-attention with the decoder
        assert config["tied"]["text_encoder.encoder.layer.0.intermediate.dense.weight"] == (
            "text_decoder.bert.encoder.layer.0.intermediate.dense.weight")  # fmt: skip
    loaded = ck.from_pretrained(directory)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    if kind == "pretrain":
        layer_enc, layer_dec = loaded.text_encoder.encoder.layer[0], loaded.text_decoder.bert.encoder.layer[0]
        assert layer_enc.intermediate.dense.weight is layer_dec.intermediate.dense.weight
        assert layer_enc.attention.self.query.weight is not layer_dec.attention.self.query.weight
    decoder = loaded.text_decoder
    assert decoder.cls.predictions.decoder.weight is decoder.bert.embeddings.word_embeddings.weight


def test_from_pretrained_skips_random_init_only_when_the_file_has_every_tensor(tiny, tmp_path, monkeypatch):
    model = _model("caption", tiny)
    built_on = []
    real_build = ck.build_model

    def recording_build(kind, config):
        built_on.append(torch.empty(0).device.type)  # the default device while the model is constructed
        return real_build(kind, config)

    monkeypatch.setattr(ck, "build_model", recording_build)
    tensors = dict(model.state_dict())
    assert ck._build_for_weights("caption", model.config, tensors, "cpu") is not None
    assert built_on == ["meta"]  # shapes only: the file's tensors replace every random init
    built_on.clear()
    del tensors["visual_encoder.pos_embed"]
    rebuilt = ck._build_for_weights("caption", model.config, tensors, "cpu")
    assert built_on == ["meta", "cpu"]  # a tensor the file lacks: built normally, nothing left uninitialised
    assert rebuilt.visual_encoder.pos_embed.device.type == "cpu"


def test_from_pretrained_rejects_unknown_config_keys(tiny, tmp_path):
    directory = ck.save_pretrained(_model("caption", tiny), tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    config["config"]["vision"]["widht"] = 3
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ck.CheckpointError, match="widht"):
        ck.from_pretrained(directory)


# ----------------------------------------------------------------------- official layout: every kind round-trips

ALL_KINDS = ["pretrain", "retrieval", "itm", "caption", "vqa", "nlvr", "features"]


def _wide_vision(config):
    """Vision wider than text (128 vs 64), as ViT-L (1024) under a BERT-base text stack (768); 64-dim heads, so the
    head counts are read from the widths without hints, as for the released files."""
    return config.replace(vision={"width": 128, "heads": 2},
                          text={"hidden_size": 64, "num_attention_heads": 1, "encoder_width": 128})  # fmt: skip


def _official_layout(model):
    """Our state dict is the official key layout; the released files (transformers 4.15 BERT) also persist the
    `embeddings.position_ids` buffers, so add them as they come."""
    state = dict(model.state_dict())
    for key in [k for k in state if k.endswith("embeddings.position_embeddings.weight")]:
        positions = state[key].shape[0]
        state[key.replace("position_embeddings.weight", "position_ids")] = torch.arange(positions)[None]
    return state


def _forward_of_kind(kind, model, config):
    """Each kind's own forward on fixed inputs; returns its output tensors by name."""
    import dataclasses

    pixels, input_ids, mask = _inputs(config)
    torch.manual_seed(3)  # pretrain / retrieval sample ITM hard negatives: same draws for both models
    if kind in ("pretrain", "retrieval"):
        extra = {"image_ids": torch.tensor([0, 1])} if kind == "retrieval" else {}
        output = model(pixels, input_ids, mask, **extra)
    elif kind == "itm":
        output = model(pixels, input_ids, mask, match_head="both")
    elif kind == "caption":
        output = model(pixels, input_ids, mask)
    elif kind == "vqa":
        answers = torch.tensor([[101, 2417, 102], [101, 2630, 102], [101, 2048, 102]])
        output = model(pixels, input_ids, mask, answers, torch.ones_like(answers), torch.tensor([0.5, 0.5, 1.0]), [2, 1])
    elif kind == "nlvr":
        output = model(pixels, pixels.flip(0), input_ids, mask, labels=torch.tensor([1, 0]))
    else:
        output = model(pixels, input_ids, mask, mode="multimodal")
    tensors = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    return {name: value for name, value in tensors.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("wide", [False, True], ids=["tiny", "wide_vision"])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_official_layout_round_trip_of_every_kind(tiny, tmp_path, kind, wide):
    config = _wide_vision(tiny) if wide else tiny
    model = _model(kind, config)
    path = _save_pth(tmp_path / f"{kind}.pth", _official_layout(model), epoch=1)
    loaded, report = ck.load_official(path, **({} if wide else TINY_HEADS))
    assert report.kind == kind and report.source_kind == kind
    assert report.ok and not report.unexpected and not report.ignored_training_state and not report.initialized
    assert (loaded.config.vision.width, loaded.config.text.hidden_size) == (config.vision.width, config.text.hidden_size)
    assert loaded.config.text.encoder_width == config.vision.width  # cross-attention keys read ViT tokens
    with torch.no_grad():
        expected, actual = _forward_of_kind(kind, model, config), _forward_of_kind(kind, loaded, config)
    assert expected and expected.keys() == actual.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=f"{kind}.{name}")


def test_drop_path_follows_the_reference_constructors(tiny):
    """0.1 for VQA and NLVR2 and for any ViT-L (width 1024) model, else 0: the architecture read from a file decides."""
    arch = ck.infer_architecture(_model("caption", _wide_vision(tiny)).state_dict())
    rates = {kind: ck.config_from_architecture(arch, kind).vision.drop_path_rate for kind in ALL_KINDS}
    assert rates == {kind: 0.1 if kind in ("vqa", "nlvr") else 0.0 for kind in ALL_KINDS}
    arch["vision"]["width"] = 1024
    assert {ck.config_from_architecture(arch, kind).vision.drop_path_rate for kind in ALL_KINDS} == {0.1}
