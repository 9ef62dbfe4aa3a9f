"""`blip infer caption | itm | vqa | features | classify` on tiny checkpoints in all three formats (ours, official .pth,
transformers directory), plus the one-line errors for a wrong checkpoint kind, an unreadable image, an empty text."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from blip_models import checkpoints as ck
from blip_models.configuration_blip import preset
from pipelines.cli import main


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: contended threads make tiny models slow
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def config64():
    """Tiny, but with 64-dim heads so official-layout files need no head-count hint (as the released ones)."""
    return preset("tiny").replace(vision={"width": 64, "heads": 1},
                                  text={"hidden_size": 64, "num_attention_heads": 1, "encoder_width": 64})  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for index, color in enumerate([(255, 0, 0), (0, 128, 255), (40, 200, 40)]):
        Image.new("RGB", (40 + 8 * index, 30), color).save(folder / f"img{index}.png")
    (folder / "notes.txt").write_text("not an image, not listed")
    return folder


def _build(kind, config):
    torch.manual_seed(0)
    return ck.build_model(kind, config).eval()


@pytest.fixture(scope="module")
def caption_dir(tmp_path_factory, config64):
    return ck.save_pretrained(_build("caption", config64), tmp_path_factory.mktemp("ckpt") / "caption")


def _json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_caption_folder_batched_from_our_directory(caption_dir, images, capsys):
    code = main(["infer", "caption", "--checkpoint", str(caption_dir), "--image", str(images), "--batch-size", "2",
                 "--json", "--max-length", "10"])  # fmt: skip
    assert code == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [row["image"].rsplit("/", 1)[-1] for row in rows] == ["img0.png", "img1.png", "img2.png"]
    assert all(isinstance(row["caption"], str) for row in rows)


def test_caption_is_reproducible_and_matches_the_model(caption_dir, images, capsys):
    from blip_models.inference import CaptionSettings, caption, load_images
    from blip_models.tokenizer import load_tokenizer

    main(["infer", "caption", "--checkpoint", str(caption_dir), "--image", str(images / "img1.png"),
          "--max-length", "10"])  # fmt: skip
    out = capsys.readouterr().out.strip()
    model = ck.from_pretrained(caption_dir)
    expected = caption(model, load_tokenizer(), load_images([images / "img1.png"], 32),
                       CaptionSettings(max_length=10))[0]  # fmt: skip
    assert out == f"{images / 'img1.png'}\t{expected}"


def test_several_captions_per_image_beams_and_seeded_samples(caption_dir, images, capsys):
    """LAVIS's num_captions: the N best beams (the first is the single-caption answer), or N nucleus samples that
    the same --seed repeats; beams fewer than captions is a one-line error."""
    base = ["infer", "caption", "--checkpoint", str(caption_dir), "--image", str(images), "--max-length", "10",
            "--batch-size", "2", "--json"]  # fmt: skip
    assert main(base) == 0
    single = [row["caption"] for row in _json_lines(capsys.readouterr().out)]
    assert main([*base, "--num-captions", "3"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [row["caption"] for row in rows] == single and all(len(row["captions"]) == 3 for row in rows)
    assert all(row["captions"][0] == row["caption"] for row in rows)
    sampled = [*base, "--sample", "--num-captions", "4", "--seed", "7"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first  # the same seed: the same captions
    assert all(len(row["captions"]) == 4 for row in _json_lines(first))
    assert main([*base[:-1], "--num-captions", "2"]) == 0  # text output: one line a caption
    assert len(capsys.readouterr().out.strip().splitlines()) == 3 * 2
    assert main([*base, "--num-captions", "5"]) == 2
    assert "--num-captions 5 > --num-beams 3" in capsys.readouterr().err


def test_itm_from_an_official_pth(tmp_path, config64, images, capsys):
    path = tmp_path / "model_base_retrieval_tiny.pth"
    torch.save({"model": _build("retrieval", config64).state_dict(), "epoch": 1}, path)
    code = main(["infer", "itm", "--checkpoint", str(path), "--image", str(images / "img0.png"),
                 "--text", "a red square", "--text", "a blue sky", "--json"])  # fmt: skip
    assert code == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert [result["text"] for result in row["results"]] == ["a red square", "a blue sky"]
    for result in row["results"]:
        assert 0.0 <= result["itm_probability"] <= 1.0 and -1.0 <= result["itc_cosine"] <= 1.0


def test_itm_gradcam_maps_each_word_over_the_patches(config64):
    """LAVIS's GradCAM: per (image, text), one map per word piece over the patch grid and their average; the
    explicit attention it reads scores as the fused kernel does; the model's parameters get no gradient."""
    from blip_models.inference import gradcam, itm
    from blip_models.tokenizer import load_tokenizer

    model, tokenizer = _build("itm", config64), load_tokenizer()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # patches that differ
    texts = ["a red square", "two blue circles on grass"]
    results = gradcam(model, tokenizer, pixels, texts)
    grid = 32 // config64.vision.patch_size
    with torch.no_grad():
        scores = itm(model, tokenizer, pixels, texts)
    assert len(results) == 4
    for index, result in enumerate(results):
        assert result.tokens == tokenizer.tokenize(texts[index % 2])
        assert result.per_token.shape == (len(result.tokens), grid, grid) and result.average.shape == (grid, grid)
        assert (result.per_token >= 0).all() and result.per_token.sum() > 0
        torch.testing.assert_close(result.average, result.per_token.mean(0))
        assert result.itm_probability == pytest.approx(scores[index]["itm_probability"], abs=1e-5)
    assert all(parameter.grad is None for parameter in model.parameters())
    attention = model.text_encoder.encoder.layer[-1].crossattention.self
    assert not attention.keep_attention and attention.attention_probs is None  # switched back
    with pytest.raises(ValueError, match="block 9 is not a layer of the text encoder"):
        gradcam(model, tokenizer, pixels, texts, block=9)


def test_infer_itm_writes_gradcam_pictures(tmp_path, config64, images, capsys):
    directory = ck.save_pretrained(_build("itm", config64), tmp_path / "itm")
    args = ["infer", "itm", "--checkpoint", str(directory), "--image", str(images), "--text", "a red square",
            "--text", "grass", "--gradcam", str(tmp_path / "cams"), "--json", "--batch-size", "2"]
    assert main(args) == 0
    rows = _json_lines(capsys.readouterr().out)
    written = sorted(path.name for path in (tmp_path / "cams").iterdir())
    assert written == sorted(f"img{i}.png-t{j}.png" for i in range(3) for j in range(2))
    for row in rows:
        for result in row["results"]:
            with Image.open(result["gradcam"]) as picture:  # the average and one panel per word, labelled
                panels = 1 + len(result["text"].split())
                assert picture.size == (panels * 32, 32 + 14)
    assert main([*args[:-3], "--gradcam-block", "7"]) == 2
    assert "block 7 is not a layer of the text encoder (0 to 1)" in capsys.readouterr().err


def test_search_ranks_a_folder_for_each_query_and_keeps_its_features(tmp_path, config64, images, capsys):
    """Text-to-image search (LAVIS's multimodal search): the folder's images by ITC cosine with the query, batched
    as one pass; --rerank K orders the K best by ITM; --gallery-cache encodes the folder once and again only when
    an image changes."""
    import shutil

    from blip_models.inference import image_features, label_features, load_images
    from blip_models.tokenizer import load_tokenizer

    folder = tmp_path / "gallery"
    shutil.copytree(images, folder)
    directory = ck.save_pretrained(_build("retrieval", config64), tmp_path / "retrieval")
    cache = tmp_path / "gallery.pt"
    base = ["infer", "search", "--checkpoint", str(directory), "--image", str(folder), "--query", "a red square",
            "--query", "green grass", "--batch-size", "2", "--gallery-cache", str(cache), "--json"]  # fmt: skip
    assert main(base) == 0
    out = capsys.readouterr()
    rows = _json_lines(out.out)
    assert [row["query"] for row in rows] == ["a red square", "green grass"] and "reused" not in out.err
    paths = sorted(folder.glob("*.png"))
    model = ck.from_pretrained(directory)
    with torch.no_grad():
        cosine = label_features(model, load_tokenizer(), ["a red square", "green grass"]) @ image_features(
            model, load_images(paths, 32)).T  # fmt: skip
    for row, expected in zip(rows, cosine):
        order = expected.argsort(descending=True).tolist()
        assert [entry["image"] for entry in row["results"]] == [str(paths[i]) for i in order]  # 3 < top-k 5
        assert [entry["itc_cosine"] for entry in row["results"]] == pytest.approx(expected[order].tolist(), abs=1e-5)

    assert main(base) == 0  # the same folder and weights: the kept features
    again = capsys.readouterr()
    assert again.out == out.out and "3 image features reused" in again.err
    Image.new("RGB", (40, 30), (9, 9, 9)).save(folder / "img0.png")  # an image changed: it alone encoded again
    Image.new("RGB", (30, 40), (200, 9, 9)).save(folder / "new.png")  # and one added
    assert main([*base, "--top-k", "1", "--rerank", "2"]) == 0
    changed = capsys.readouterr()
    assert "2 image features reused, 2 new or changed encoded" in changed.err
    for row in _json_lines(changed.out):
        (best,) = row["results"]
        assert "itm_probability" in best
    cache.rename(tmp_path / "kept.pt")  # the mixed gallery is the one a full encoding gives
    assert main([*base, "--top-k", "4"]) == 0
    full = capsys.readouterr().out
    cache.unlink()
    (tmp_path / "kept.pt").rename(cache)
    assert main([*base, "--top-k", "4"]) == 0
    mixed = capsys.readouterr()
    assert "4 image features reused" in mixed.err
    for ours, theirs in zip(_json_lines(mixed.out), _json_lines(full), strict=True):  # batches differ: not bit-equal
        assert [e["image"] for e in ours["results"]] == [e["image"] for e in theirs["results"]]
        assert [e["itc_cosine"] for e in ours["results"]] == pytest.approx([e["itc_cosine"] for e in theirs["results"]],
                                                                           abs=1e-5)  # fmt: skip
    assert main([*base, "--precision", "bf16"]) == 0
    assert "made with other weights, image size or precision" in capsys.readouterr().err
    torch.save({"key": {}, "image_feature": torch.zeros(3, 4)}, cache)  # an earlier layout: one key for all
    assert main(base) == 0
    assert "not a gallery cache of this version of blip infer" in capsys.readouterr().err
    assert main([*base[:3], str(tmp_path / "no-such-model"), *base[4:]]) == 2


def test_images_by_url_and_several_image_options(tmp_path, caption_dir, images, capsys):
    """`--image` takes http(s) URLs and object-store URLs (an image or a prefix; fetched once, shown as given)
    beside files and folders, repeated; a URL that fails or is not an image is one line naming it."""
    from http_files import serve_files

    (tmp_path / "page.html").write_text("<html>not an image</html>")
    base = ["infer", "caption", "--checkpoint", str(caption_dir), "--json", "--max-length", "10"]
    assert main([*base, "--image", str(images)]) == 0
    by_file = {Path(row["image"]).name: row["caption"] for row in _json_lines(capsys.readouterr().out)}
    with serve_files(images) as served:
        url = f"{served.url}/img1.png"
        assert main([*base, "--image", url, "--image", str(images / "img0.png")]) == 0
        rows = _json_lines(capsys.readouterr().out)
        assert [row["image"] for row in rows] == [url, str(images / "img0.png")]
        assert [row["caption"] for row in rows] == [by_file["img1.png"], by_file["img0.png"]]
        assert main([*base, "--image", f"{served.url}/missing.png"]) == 2
        assert f"cannot fetch image {served.url}/missing.png: HTTP 404" in capsys.readouterr().err
    import fsspec  # an object store (memory:// standing in for s3://): an image, or a prefix's images
    import uuid

    store = f"memory://infer-{uuid.uuid4().hex[:8]}"
    for name in ("img0.png", "img2.png"):
        fsspec.filesystem("memory").pipe(f"{store}/pics/{name}", (images / name).read_bytes())
    assert main([*base, "--image", f"{store}/pics", "--image", f"{store}/pics/img2.png"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [row["image"] for row in rows] == [f"{store}/pics/img0.png", f"{store}/pics/img2.png",
                                              f"{store}/pics/img2.png"]  # fmt: skip
    assert [row["caption"] for row in rows] == [by_file["img0.png"], by_file["img2.png"], by_file["img2.png"]]
    assert main([*base, "--image", f"{store}/nothing.png"]) == 2
    assert f"image not found: {store}/nothing.png" in capsys.readouterr().err
    with serve_files(tmp_path) as served:
        assert main([*base, "--image", f"{served.url}/page.html"]) == 2
        err = capsys.readouterr().err
        assert f"{served.url}/page.html is not an image (" in err and "25 bytes): UnidentifiedImageError" in err


def test_vqa_rank_and_generate(tmp_path, config64, images, capsys):
    directory = ck.save_pretrained(_build("vqa", config64), tmp_path / "vqa")
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps(["red", "blue", "two"]))
    code = main(["infer", "vqa", "--checkpoint", str(directory), "--image", str(images), "--question",
                 "what color is it?", "--answers", str(answers), "--json"])  # fmt: skip
    assert code == 0
    rows = _json_lines(capsys.readouterr().out)
    assert len(rows) == 3 and all(row["answers"][0]["answer"] in {"red", "blue", "two"} for row in rows)
    assert main(["infer", "vqa", "--checkpoint", str(directory), "--image", str(images / "img0.png"),
                 "--question", "what is it?"]) == 0  # fmt: skip
    assert capsys.readouterr().out.count("\t") == 2


def test_features_to_file(tmp_path, config64, images, capsys):
    directory = ck.save_pretrained(_build("features", config64), tmp_path / "features")
    output = tmp_path / "feats.pt"
    code = main(["infer", "features", "--checkpoint", str(directory), "--image", str(images), "--text", "a square",
                 "--output", str(output), "--precision", "bf16"])  # fmt: skip
    assert code == 0
    saved = torch.load(output)
    assert saved["image_feature"].shape == (3, config64.embed_dim)
    assert saved["multimodal_feature"].shape == (3, 64)
    torch.testing.assert_close(saved["image_feature"].norm(dim=-1), torch.ones(3), atol=2e-2, rtol=0)


def test_caption_from_a_transformers_directory(tmp_path, images, capsys):
    import transformers

    torch.manual_seed(0)
    config = transformers.BlipConfig(
        text_config={"vocab_size": 30524, "hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 1, "max_position_embeddings": 64},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 1,
                       "image_size": 32, "patch_size": 8},
    )  # fmt: skip
    transformers.BlipForConditionalGeneration(config).save_pretrained(tmp_path / "hf")
    assert main(["infer", "caption", "--checkpoint", str(tmp_path / "hf"), "--image", str(images / "img2.png"),
                 "--json", "--max-length", "8"]) == 0  # fmt: skip
    assert "caption" in _json_lines(capsys.readouterr().out)[0]


def test_classify_ranks_label_prompts_as_itm_scores_them(tmp_path, config64, images, capsys):
    """Zero-shot classification from an official retrieval .pth: each label's ITC cosine and (re-ranked) ITM
    probability are what `infer itm` gives its prompt, the probabilities are the softmax of the cosines over every
    label at the temperature, and the re-ranked labels come first, by ITM."""
    import math

    path = tmp_path / "model_base_retrieval_tiny.pth"
    torch.save({"model": _build("retrieval", config64).state_dict()}, path)
    labels = ["red", "blue", "green", "yellow"]
    (tmp_path / "labels.txt").write_text("\n".join(labels[2:]) + "\n")
    code = main(["infer", "classify", "--checkpoint", str(path), "--image", str(images / "img0.png"), "--label", "red",
                 "--label", "blue", "--labels", str(tmp_path / "labels.txt"), "--top-k", "4", "--rerank", "2",
                 "--temperature", "0.5", "--json"])  # fmt: skip
    assert code == 0
    (row,) = _json_lines(capsys.readouterr().out)
    ranked = row["labels"]
    assert sorted(entry["label"] for entry in ranked) == sorted(labels)
    assert ranked[0]["itm_probability"] >= ranked[1]["itm_probability"] and "itm_probability" not in ranked[2]
    assert ranked[2]["itc_cosine"] >= ranked[3]["itc_cosine"]
    assert min(e["itc_cosine"] for e in ranked[:2]) >= max(e["itc_cosine"] for e in ranked[2:])  # the ITC shortlist
    total = sum(math.exp(entry["itc_cosine"] / 0.5) for entry in ranked)
    for entry in ranked:
        assert entry["probability"] == pytest.approx(math.exp(entry["itc_cosine"] / 0.5) / total, rel=1e-4)
    assert main(["infer", "itm", "--checkpoint", str(path), "--image", str(images / "img0.png"), "--json",
                 *[arg for entry in ranked for arg in ("--text", f"a picture of {entry['label']}")]]) == 0  # fmt: skip
    (scored,) = _json_lines(capsys.readouterr().out)
    for entry, result in zip(ranked, scored["results"]):
        assert entry["itc_cosine"] == pytest.approx(result["itc_cosine"], abs=1e-5)
        if "itm_probability" in entry:
            assert entry["itm_probability"] == pytest.approx(result["itm_probability"], abs=1e-5)
    assert main(["infer", "classify", "--checkpoint", str(path), "--image", str(images), "--label", "red",
                 "--label", "blue", "--top-k", "1"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.split("\t")[1] in ("red", "blue") and "\tp=" in line for line in lines)


def test_classify_errors_are_one_line(caption_dir, tmp_path, config64, images, capsys):
    features = ck.save_pretrained(_build("features", config64), tmp_path / "features")
    base = ["infer", "classify", "--checkpoint", str(features), "--image", str(images)]
    assert main(base) == 2
    assert "classify needs labels" in _error_line(capsys)
    assert main([*base, "--label", "cat", "--label", "cat"]) == 2
    assert "label 'cat' is given more than once" in _error_line(capsys)
    assert main([*base, "--label", "cat", "--template", "a photo of a cat"]) == 2
    assert "has no '{}' where the label goes" in _error_line(capsys)
    assert main([*base, "--label", "cat", "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in _error_line(capsys)
    assert main([*base, "--label", "cat", "--rerank", "2"]) == 2  # a features model has no ITM head
    assert "cannot serve `infer classify`" in _error_line(capsys)
    assert main(["infer", "classify", "--checkpoint", str(caption_dir), "--image", str(images), "--label", "x"]) == 2
    assert "cannot serve `infer classify`" in _error_line(capsys)


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, no traceback
    return err[0]


def test_wrong_checkpoint_kind_is_one_line(caption_dir, images, capsys):
    assert main(["infer", "itm", "--checkpoint", str(caption_dir), "--image", str(images), "--text", "x"]) == 2
    line = _error_line(capsys)
    assert "cannot serve `infer itm`" in line and "'caption'" in line


def test_unreadable_image_is_one_line(caption_dir, tmp_path, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    assert main(["infer", "caption", "--checkpoint", str(caption_dir), "--image", str(bad)]) == 2
    assert "cannot read image" in _error_line(capsys)


def test_empty_text_and_missing_paths_are_one_line(caption_dir, images, tmp_path, capsys):
    assert main(["infer", "itm", "--checkpoint", str(caption_dir), "--image", str(images), "--text", "  "]) == 2
    assert "empty text" in _error_line(capsys)
    assert main(["infer", "caption", "--checkpoint", str(tmp_path / "nope"), "--image", str(images)]) == 2
    assert "not found" in _error_line(capsys)
    assert main(["infer", "caption", "--checkpoint", str(caption_dir), "--image", str(tmp_path / "none.png")]) == 2
    assert "image not found" in _error_line(capsys)


def test_load_report_names_kind_architecture_and_skipped_keys(tmp_path, config64, images, capsys):
    """A pretrain .pth served as ITM skips its decoder and its momentum/queue state: said on stderr, not silently."""
    path = tmp_path / "model_base_tiny.pth"
    torch.save({"model": _build("pretrain", config64).state_dict()}, path)
    args = ["infer", "itm", "--checkpoint", str(path), "--image", str(images / "img0.png"), "--text", "a red square"]
    assert main(args) == 0
    captured = capsys.readouterr()
    (report,) = captured.err.strip().splitlines()  # one paragraph
    assert report.startswith(f"load: {path} (official, a 'pretrain' checkpoint) as the 'itm' model; ViT 2 x 64")
    assert " 0 missing" in report and "unexpected (text_decoder." in report and "(--verbose lists every key)" in report
    assert "ignored momentum/queue (" in report
    assert "\t" in captured.out  # results on stdout, the report never mixed in
    assert main([*args, "--verbose"]) == 0
    lines = capsys.readouterr().err.strip().splitlines()
    unexpected = next(line for line in lines if line.startswith("  unexpected: ")).removeprefix("  unexpected: ").split(", ")
    assert len(unexpected) > 3 and all(key.startswith("text_decoder.") for key in unexpected)
    assert any(line.startswith("  ignored momentum/queue: ") and "image_queue" in line for line in lines)


def test_our_directory_of_the_requested_kind_loads_quietly(caption_dir, images, capsys):
    assert main(["infer", "caption", "--checkpoint", str(caption_dir), "--image", str(images / "img0.png"),
                 "--max-length", "6"]) == 0  # fmt: skip
    assert capsys.readouterr().err.strip() == ""  # nothing skipped, nothing to report


def test_python_dash_m_turns_command_errors_into_one_line(tmp_path):
    """Under `python -m pipelines.cli` the file runs as `__main__`; a CommandError from a command module must still
    be a one-line error with exit 2, not a traceback."""
    import subprocess
    import sys

    missing = tmp_path / "missing.pth"
    result = subprocess.run([sys.executable, "-m", "pipelines.cli", "infer", "caption", "--checkpoint", str(missing),
                             "--image", str(tmp_path / "none.png")], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [f"blip infer: error: image not found: {tmp_path / 'none.png'}"]


def test_a_checkpoint_name_loads_its_file_from_the_cache(tmp_path, config64, images, capsys, monkeypatch):
    """BLIP's and LAVIS's names stand for their files' URLs: a file already in the checkpoint cache is read there
    (nothing can be downloaded here: a download would fail the test), with the same results as its path."""
    monkeypatch.setenv("BLIP_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    path = tmp_path / "cache" / "blip_coco_caption_base.pth"  # the file LAVIS's blip_caption/base_coco loads
    torch.save({"model": _build("caption", config64).state_dict(), "epoch": 5}, path)
    args = ["--image", str(images), "--max-length", "8", "--json"]
    assert main(["infer", "caption", "--checkpoint", str(path), *args]) == 0
    by_path = _json_lines(capsys.readouterr().out)
    assert main(["infer", "caption", "--checkpoint", "blip_caption/base_coco", *args]) == 0
    assert _json_lines(capsys.readouterr().out) == by_path
    assert main(["infer", "models", "--json"]) == 0
    listed = {row["name"]: row for row in _json_lines(capsys.readouterr().out)}
    assert listed["blip_caption/base_coco"]["cached"] == str(path) and listed["model_base"]["cached"] is None
    assert listed["model_base"]["url"] == ck.OFFICIAL_URL_PREFIX + "model_base.pth"
    assert listed["Salesforce/blip-itm-base-coco"]["kind"] == "itm"
    torch.save({"model": _build("pretrain", config64).state_dict()}, tmp_path / "cache" / "model_base.pth")
    assert ck.read_official("model_base").keys() == _build("pretrain", config64).state_dict().keys()  # `train --init`


def test_an_unknown_checkpoint_name_is_one_line_with_the_names_it_resembles(images, capsys):
    assert main(["infer", "caption", "--checkpoint", "model_base_capfilt_larg", "--image", str(images)]) == 2
    line = _error_line(capsys)
    assert "checkpoint not found: model_base_capfilt_larg (did you mean model_base_capfilt_large" in line
    assert line.endswith("`blip infer models` lists the checkpoint names")


def test_lavis_load_model_and_preprocess_downloads_once_and_returns_its_processors(tmp_path, config64, monkeypatch):
    """LAVIS's call, the weights served by a real HTTP server on 127.0.0.1 in place of LAVIS's bucket: downloaded
    into the cache once, then read from it."""
    import http.server
    import threading
    from functools import partial

    from blip_models.inference import load_model_and_preprocess

    served, requests = tmp_path / "served", []
    served.mkdir()
    state = _build("vqa", config64).state_dict()
    torch.save({"model": state}, served / "blip_okvqa.pth")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *_):
            requests.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/blip_okvqa.pth"
    monkeypatch.setitem(ck.LAVIS_MODELS, "blip_vqa/okvqa", (url, "vqa"))
    monkeypatch.setenv("BLIP_CHECKPOINT_CACHE", str(tmp_path / "cache"))
    try:
        for _ in range(2):
            model, vis, txt = load_model_and_preprocess("blip_vqa", "okvqa", is_eval=True)
            assert not model.training and type(model.model).__name__ == "BlipVQA"
            torch.testing.assert_close(model.model.state_dict()["text_decoder.cls.predictions.bias"],
                                       state["text_decoder.cls.predictions.bias"])  # fmt: skip
    finally:
        server.shutdown()
    assert requests == ["/blip_okvqa.pth"] and (tmp_path / "cache" / "blip_okvqa.pth").is_file()
    assert vis["eval"](Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert vis["train"](Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    assert txt["eval"]("What colour: is it? ") == "what colour is it?"  # BLIP's pre_question
    from blip_models.inference import load_model

    assert type(load_model("blip_vqa", "okvqa").model).__name__ == "BlipVQA"  # from the cache: no request
    assert requests == ["/blip_okvqa.pth"]
    samples = {"image": vis["eval"](Image.new("RGB", (50, 40))).unsqueeze(0), "text_input": [txt["eval"]("Colour?")]}
    assert model.predict_answers(samples, answer_list=["red", "blue"])[0] in {"red", "blue"}  # LAVIS's call
    with pytest.raises(ck.CheckpointError, match="LAVIS has no BLIP model 'blip_vqa' of type 'vqa' "
                                                 r"\(its model types: aokvqa, okvqa, vqav2\)"):  # fmt: skip
        load_model_and_preprocess("blip_vqa", "vqa")
