"""Downstream annotation loaders on generated data in the public schemas, and their errors on malformed files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.tasks.downstream_data import (
    AnnotationError,
    CaptionPair,
    NLVRPair,
    VQAQuestion,
    build_retrieval_eval,
    caption_train_text,
    coco_image_id,
    consecutive_image_ids,
    load_answer_list,
    load_caption_eval,
    load_caption_pairs,
    load_caption_train,
    load_coco_caption_gt,
    load_msrvtt,
    load_nlvr,
    load_nocaps,
    load_vqa,
    load_vqa_official,
    nlvr_train_swap,
    read_video_frames,
    video_frame_indices,
    vqa_answer_weights,
    vqa_train_example,
)
from pipelines.tasks.downstream_synth import write_karpathy, write_msrvtt, write_nlvr, write_nocaps, write_vqa


def _write(path: Path, payload) -> Path:
    path.write_text(json.dumps(payload))
    return path


# ------------------------------------------------------------------------------ retrieval and captioning


def test_coco_karpathy_files_round_trip(tmp_path: Path):
    files = write_karpathy(tmp_path, "coco", num_train=3, num_val=2, num_test=2, captions_per_image=5)
    raw_train = json.loads(files["coco_karpathy_train"].read_text())
    assert set(raw_train[0]) == {"image", "caption", "image_id"} and raw_train[0]["image_id"].startswith("coco_")
    train = load_caption_train(files["coco_karpathy_train"])
    assert len(train) == 15
    assert consecutive_image_ids(train) == [0] * 5 + [1] * 5 + [2] * 5
    assert Image.open(tmp_path / train[0].image).size == (64, 64)
    pair = CaptionPair("a.jpg", "Two RED circles!  On grey.", "coco_1")
    assert caption_train_text(pair) == "a picture of two red circles on grey"
    assert caption_train_text(pair, prompt="") == "two red circles on grey"

    val = load_caption_eval(files["coco_karpathy_val"])
    assert [len(item.captions) for item in val] == [5, 5]
    eval_set = build_retrieval_eval(val)
    assert eval_set.img2txt == ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9))
    assert eval_set.txt2img == (0,) * 5 + (1,) * 5
    assert eval_set.texts[0] == eval_set.texts[0].lower() and "." not in eval_set.texts[0]  # pre_caption'd

    gt = load_coco_caption_gt(files["coco_karpathy_val_gt"])
    assert gt.image_ids == tuple(coco_image_id(item.image) for item in val)
    assert gt.captions[gt.image_ids[0]] == val[0].captions


def test_flickr_files_and_image_ids(tmp_path: Path):
    files = write_karpathy(tmp_path, "flickr", num_train=2, num_val=1, num_test=1, captions_per_image=5)
    assert set(files) == {"flickr30k_train", "flickr30k_val", "flickr30k_test"}  # no GT files for Flickr
    train = load_caption_train(files["flickr30k_train"])
    assert train[0].image.startswith("flickr30k-images/") and train[0].image_id == Path(train[0].image).stem
    assert (tmp_path / load_caption_eval(files["flickr30k_test"])[0].image).exists()
    assert coco_image_id("val2014/COCO_val2014_000000391895.jpg") == 391895
    with pytest.raises(ValueError, match="COCO image id"):
        coco_image_id("flickr30k-images/abc.jpg")


def test_malformed_files_name_file_record_and_field(tmp_path: Path):
    path = _write(tmp_path / "coco_karpathy_train.json",
                  [{"image": "a.jpg", "caption": "x", "image_id": "1"}, {"image": "b.jpg", "image_id": "2"}])
    with pytest.raises(AnnotationError, match=r"coco_karpathy_train\.json: record 1: field 'caption': missing") as info:
        load_caption_train(path)
    assert (info.value.index, info.value.field) == (1, "caption")
    path = _write(tmp_path / "val.json", [{"image": "a.jpg", "caption": "not a list"}])
    with pytest.raises(AnnotationError, match=r"record 0: field 'caption': expected list"):
        load_caption_eval(path)
    path = _write(tmp_path / "gt.json", {"images": [{"id": 1}], "annotations": [{"image_id": 2, "caption": "c",
                                                                                 "id": 0}]})
    with pytest.raises(AnnotationError, match="image_id 2 not listed"):
        load_coco_caption_gt(path)
    with pytest.raises(AnnotationError, match="field 'annotations'"):
        load_coco_caption_gt(_write(tmp_path / "gt2.json", {"images": []}))
    with pytest.raises(AnnotationError, match="expected a JSON list"):
        load_caption_train(_write(tmp_path / "obj.json", {"image": "a"}))
    with pytest.raises(AnnotationError, match="not found"):
        load_caption_train(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(AnnotationError, match="not valid JSON"):
        load_caption_train(tmp_path / "broken.json")
    with pytest.raises(AnnotationError, match="field 'img_id': expected int"):
        load_nocaps(_write(tmp_path / "nocaps_val.json", [{"image": "a.jpg", "img_id": "7"}]))


def test_vg_caption_pairs_share_an_image_id_per_image(tmp_path: Path):
    from pipelines.tasks.downstream_synth import write_vg_caption

    path = write_vg_caption(tmp_path, num_images=4, captions_per_image=3, image_size=32)["vg_caption"]
    pairs = load_caption_pairs(path)
    assert len(pairs) == 12 and all((tmp_path / pair.image).is_file() for pair in pairs)
    assert [pair.image_id for pair in pairs[:3]] == ["VG_100K/1.jpg"] * 3  # no image_id in the file: the path
    assert consecutive_image_ids(pairs) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with_ids = load_caption_pairs(_write(tmp_path / "ids.json", [{"image": "a.jpg", "caption": "x", "image_id": 7}]))
    assert with_ids[0].image_id == "7"
    with pytest.raises(AnnotationError, match=r"vg\.json: record 1: field 'caption': missing"):
        load_caption_pairs(_write(tmp_path / "vg.json", [{"image": "a.jpg", "caption": "x"}, {"image": "b.jpg"}]))


def test_nocaps(tmp_path: Path):
    files = write_nocaps(tmp_path, num_val=3, num_test=2)
    val = load_nocaps(files["nocaps_val"])
    assert [image.img_id for image in val] == [0, 1, 2] and (tmp_path / val[0].image).exists()


# --------------------------------------------------------------------------------------------------- VQA


def test_vqa_files_and_answer_weights(tmp_path: Path):
    files = write_vqa(tmp_path, num_train_images=3, num_val_images=2, num_test_images=2, num_vg_images=2)
    train = load_vqa(files["vqa_train"])
    assert train and all(q.dataset == "vqa" and len(q.answers) == 10 for q in train)
    assert set(json.loads(files["vqa_train"].read_text())[0]) == {"question_id", "question", "answer", "image",
                                                                  "dataset"}
    vg = load_vqa(files["vg_qa"])
    assert all(q.dataset == "vg" and len(q.answers) == 1 for q in vg)
    assert vqa_answer_weights(vg[0]) == {vg[0].answers[0]: 0.2}
    test = load_vqa(files["vqa_test"], split="test")
    assert all(q.answers == () and isinstance(q.question_id, int) for q in test)
    answer_list = load_answer_list(files["answer_list"])
    assert {a for q in train for a in q.answers} <= set(answer_list)

    official = load_vqa_official(files["val_questions"], files["val_annotations"])
    val = load_vqa(files["vqa_val"])
    assert [(t.question_id, t.answers) for t in official] == [(q.question_id, q.answers) for q in val]
    assert {t.answer_type for t in official} <= {"yes/no", "number", "other"}
    for question in train:
        weights = vqa_answer_weights(question)
        assert sum(weights.values()) == pytest.approx(1.0)


def test_vqa_weights_hand_computed():
    question = VQAQuestion(1, "How many shapes?", "a.jpg", ("2",) * 7 + ("two",) * 2 + ("3",), "vqa")
    weights = vqa_answer_weights(question)
    assert weights == pytest.approx({"2": 0.7, "two": 0.2, "3": 0.1})
    text, answers, answer_weights = vqa_train_example(question)
    assert text == "how many shapes?" and answers == ["2", "two", "3"]
    assert answer_weights == pytest.approx([0.7, 0.2, 0.1])
    with pytest.raises(ValueError, match="no training answers"):
        vqa_answer_weights(VQAQuestion(2, "q", "a.jpg", (), "test"))


def test_vqa_malformed(tmp_path: Path):
    good = {"question_id": 1, "question": "q?", "answer": ["a"] * 10, "image": "x.jpg", "dataset": "vqa"}
    path = _write(tmp_path / "vqa_train.json", [good, {**good, "dataset": "gqa"}])
    with pytest.raises(AnnotationError, match="record 1: field 'dataset'"):
        load_vqa(path)
    path = _write(tmp_path / "vqa_train.json", [good, {k: v for k, v in good.items() if k != "answer"}])
    with pytest.raises(AnnotationError, match="record 1: field 'answer': missing"):
        load_vqa(path)
    path = _write(tmp_path / "vqa_test.json", [{"question": "q?", "image": "x.jpg"}])
    with pytest.raises(AnnotationError, match="record 0: field 'question_id': missing"):
        load_vqa(path, split="test")
    with pytest.raises(AnnotationError, match="duplicate"):
        load_answer_list(_write(tmp_path / "answer_list.json", ["yes", "no", "yes"]))


# ------------------------------------------------------------------------------------------------- NLVR2


def test_nlvr_files_labels_and_swap(tmp_path: Path):
    files = write_nlvr(tmp_path, num_train=4, num_dev=4, num_test=2)
    raw = json.loads(files["nlvr_dev"].read_text())
    pairs = load_nlvr(files["nlvr_dev"])
    assert [p.label for p in pairs] == [1 if r["label"] == "True" else 0 for r in raw]
    assert all((tmp_path / image).exists() for p in pairs for image in p.images)

    pair = NLVRPair(("l.png", "r.png"), "The left image has more dogs than the right image.", 1)
    outcomes = {nlvr_train_swap(pair, random.Random(seed)) for seed in range(20)}
    assert outcomes == {("l.png", "r.png", "the left image has more dogs than the right image"),
                        ("r.png", "l.png", "the right image has more dogs than the left image")}
    plain = NLVRPair(("l.png", "r.png"), "Two dogs.", 0)
    assert {nlvr_train_swap(plain, random.Random(seed))[:2] for seed in range(20)} == {("l.png", "r.png"),
                                                                                      ("r.png", "l.png")}

    bad = _write(tmp_path / "nlvr_bad.json", [{**raw[0], "label": True}, {**raw[0], "images": ["a.png"]}])
    with pytest.raises(AnnotationError, match="record 0: field 'label': expected str"):
        load_nlvr(bad)
    bad = _write(tmp_path / "nlvr_bad.json", [{**raw[0], "label": "yes"}])
    with pytest.raises(AnnotationError, match="'True' or 'False'"):
        load_nlvr(bad)
    bad = _write(tmp_path / "nlvr_bad.json", [{**raw[0], "images": ["a.png"]}])
    with pytest.raises(AnnotationError, match="exactly 2 images"):
        load_nlvr(bad)


# ------------------------------------------------------------------------------------------------ MSRVTT


def test_msrvtt_videos_and_frames(tmp_path: Path):
    files = write_msrvtt(tmp_path, num_videos=2, num_frames=16, frame_size=64)
    clips = load_msrvtt(files["msrvtt_test"])
    assert [c.clip_name for c in clips] == ["video7000", "video7001"] and "moves" in clips[0].caption
    video = tmp_path / "videos" / f"{clips[0].clip_name}.mp4"
    frames = read_video_frames(video, num_frames=8, size=32)
    assert len(frames) == 8 and frames[0].size == (32, 32)
    # The shape moves: the first and last sampled frames differ.
    assert frames[0].tobytes() != frames[-1].tobytes()
    # Uniform indices int(i * vlen / num_frm), and exactly those frames of a full decode.
    assert video_frame_indices(16, 8) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert video_frame_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert video_frame_indices(5, 8) == [0, 0, 1, 1, 2, 3, 3, 4]
    assert video_frame_indices(300, 8) == [0, 37, 75, 112, 150, 187, 225, 262]
    for length, wanted in ((16, 8), (16, 4), (300, 10)):  # BLIP's np.arange where num_frm divides vlen
        assert video_frame_indices(length, wanted) == np.arange(0, length, length / wanted, dtype=int).tolist()
    import cv2

    capture = cv2.VideoCapture(str(video))
    decoded = []
    while (frame := capture.read())[0]:
        decoded.append(cv2.cvtColor(frame[1], cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(decoded) == 16
    for wanted in (8, 3, 20):  # 20 > 16 frames: some frames repeat, as in BLIP
        sampled = read_video_frames(video, num_frames=wanted)
        expected = [decoded[i].tobytes() for i in video_frame_indices(16, wanted)]
        assert [np.asarray(f).tobytes() for f in sampled] == expected
    import fsspec  # a registry on object storage: the frames come from a URL, through a local temporary copy

    with fsspec.open("memory://videos/clip.mp4", "wb") as remote:
        remote.write(video.read_bytes())
    assert [np.asarray(f).tobytes() for f in read_video_frames("memory://videos/clip.mp4", num_frames=8)] == [
        decoded[i].tobytes() for i in video_frame_indices(16, 8)]
    (tmp_path / "bad.jsonl").write_text('{"clip_name": "video1", "caption": "x"}\n{"clip_name": "video2"}\n')
    with pytest.raises(AnnotationError, match="record 1: field 'caption': missing"):
        load_msrvtt(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="cannot open video"):
        read_video_frames(tmp_path / "videos" / "nope.mp4")


# ------------------------------------------------------------------------------------------------ VQA val held out


def test_vqa_train_on_val_switch(tmp_path: Path):
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream

    registry = Registry(tmp_path / "registry")
    sizes = dict(benchmark="vqa", num_train=2, num_val=2, num_test=1, image_size=32)
    blip = publish_downstream(DownstreamConfig(**sizes), name="vqa-blip", registry=registry)
    held_out = publish_downstream(DownstreamConfig(**sizes, vqa_train_on_val=False), name="vqa-held-out",
                                  registry=registry)
    val = load_vqa(registry.local_path(blip, "annotation/vqa_val.json"), "train")
    assert blip.metadata["train_on_val"] is True and held_out.metadata["train_on_val"] is False
    assert blip.counts["train_items"] == held_out.counts["train_items"] + len(val) and len(val) > 0
    assert held_out.counts["val_items"] == len(val)  # still published as the val split
    assert registry.local_path(held_out, "annotation/vqa_val.json").is_file()


def test_train_shards_are_published_with_the_digests_their_writer_computed(tmp_path: Path, caplog):
    import hashlib
    import logging

    from datasets_manifests.ops import verify
    from datasets_manifests.registry import Registry
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream

    registry = Registry(tmp_path / "registry")
    for benchmark in ("coco", "vqa"):  # the Karpathy stager and the other sets' writer
        config = DownstreamConfig(benchmark=benchmark, num_train=5, num_val=2, num_test=1, image_size=32,
                                  samples_per_shard=4)  # fmt: skip
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipelines.tasks.downstream"):
            manifest = publish_downstream(config, name=f"{benchmark}-digests", registry=registry)
        shards = manifest.shards("train")
        written, unit = sum(entry.num_samples for entry in shards), "pairs" if benchmark == "coco" else "questions"
        # The writing shows its progress (here a line at the end)
        assert f"downstream: train shards: {written} / {written} {unit} (100.0 %)" in caplog.text
        assert len(shards) >= 2
        for entry in shards:
            data = registry.local_path(manifest, entry.path).read_bytes()
            assert (entry.sha256, entry.bytes) == (hashlib.sha256(data).hexdigest(), len(data))
        assert verify(registry, manifest) == []

