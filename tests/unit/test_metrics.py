"""Downstream metrics checked against values computed by hand."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipelines.tasks.downstream_data import NoCapsImage, load_vqa_official
from pipelines.tasks.downstream_synth import write_vqa
from pipelines.tasks.metrics import (
    caption_scores,
    itm_eval,
    nlvr_accuracy,
    normalize_vqa_answer,
    vqa_accuracy,
    vqa_question_accuracy,
    write_nocaps_results,
    write_vqa_results,
)

# ------------------------------------------------------------------------------------------------ retrieval


def test_itm_eval_hand_computed():
    # 3 images, 6 texts; image i owns texts 2i and 2i+1.
    img2txt = [[0, 1], [2, 3], [4, 5]]
    txt2img = [0, 0, 1, 1, 2, 2]
    score_i2t = np.array([
        [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # best GT (text 0) at rank 0
        [0.9, 0.8, 0.1, 0.7, 0.6, 0.5],  # GT texts 2 (rank 5), 3 (rank 2) -> rank 2
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.4],  # GT texts 4 (rank 4), 5 (rank 5) -> rank 4
    ])
    score_t2i = np.array([
        [0.9, 0.1, 0.2],  # GT 0 -> rank 0
        [0.1, 0.9, 0.2],  # GT 0 -> rank 2
        [0.1, 0.9, 0.2],  # GT 1 -> rank 0
        [0.5, 0.4, 0.3],  # GT 1 -> rank 1
        [0.1, 0.2, 0.3],  # GT 2 -> rank 0
        [0.3, 0.2, 0.1],  # GT 2 -> rank 2
    ])
    result = itm_eval(score_i2t, score_t2i, txt2img, img2txt)
    # i2t ranks [0, 2, 4]: R@1 = 1/3, R@5 = R@10 = 1.
    assert result["txt_r1"] == pytest.approx(100 / 3)
    assert result["txt_r5"] == result["txt_r10"] == 100.0
    assert result["txt_r_mean"] == pytest.approx((100 / 3 + 200) / 3)
    # t2i ranks [0, 2, 0, 1, 0, 2]: R@1 = 3/6, R@5 = 1.
    assert result["img_r1"] == pytest.approx(50.0)
    assert result["img_r5"] == result["img_r10"] == 100.0
    assert result["img_r_mean"] == pytest.approx(250 / 3)
    assert result["r_mean"] == pytest.approx(((100 / 3 + 200) / 3 + 250 / 3) / 2)
    # Median 1-based rank: i2t [1, 3, 5] -> 3; t2i [1, 3, 1, 2, 1, 3] -> 1.5.
    assert result["txt_r_median"] == 3.0 and result["img_r_median"] == 1.5


def test_itm_eval_torch_input_ties_and_r10():
    torch = pytest.importorskip("torch")
    num = 12
    score = torch.zeros(num, num)  # all tied: stable order puts the lower index first
    result = itm_eval(score, score, list(range(num)), [[i] for i in range(num)])
    # rank of item i is i: R@1 = 1/12, R@5 = 5/12, R@10 = 10/12.
    assert result["txt_r1"] == pytest.approx(100 / 12)
    assert result["txt_r5"] == pytest.approx(500 / 12)
    assert result["img_r10"] == pytest.approx(1000 / 12)


def test_itm_eval_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="score_t2i"):
        itm_eval(np.zeros((2, 3)), np.zeros((2, 3)), [0, 1, 1], [[0], [1, 2]])
    with pytest.raises(ValueError, match="img2txt"):
        itm_eval(np.zeros((2, 3)), np.zeros((3, 2)), [0, 1, 1], [[0]])


# ----------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the red", "red"), ("A Cat.", "cat"), ("dont know", "don't know"), ("yes!", "yes"),
    ("black/white", "black white"), ("1,000", "1000"), ("2.5", "2.5"), ("none", "0"), ("  ten\n", "10"),
    ("its a dog, sir", "its dog sir"), ("an apple", "apple"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("matching, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (9, 1.0)])
def test_vqa_question_accuracy_leave_one_out(matching, expected):
    # k matching humans: k subsets see k-1 matches, 10-k subsets see k -> mean of min(1, matches/3);
    # e.g. k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6. The humans disagree, so "two" is normalised to "2".
    humans = ["2"] * matching + ["3"] * (10 - matching)
    assert vqa_question_accuracy("2", humans) == pytest.approx(expected)
    assert vqa_question_accuracy("Two", humans) == pytest.approx(expected)


def test_vqa_normalises_only_when_humans_disagree():
    # The official tool leaves answers as they are when all ten humans agree.
    assert vqa_question_accuracy("2", ["2"] * 10) == 1.0
    assert vqa_question_accuracy("two", ["2"] * 10) == 0.0
    assert vqa_question_accuracy("two", ["2"] * 9 + ["3"]) == 1.0


def test_vqa_accuracy_on_generated_official_files(tmp_path: Path):
    files = write_vqa(tmp_path, num_train_images=1, num_val_images=4, num_test_images=0, num_vg_images=0)
    truths = load_vqa_official(files["val_questions"], files["val_annotations"])
    majority = {t.question_id: Counter(t.answers).most_common(1)[0][0] for t in truths}
    expected = [vqa_question_accuracy(majority[t.question_id], t.answers) for t in truths]
    result = vqa_accuracy(majority, truths)
    assert result["overall"] == round(100 * sum(expected) / len(expected), 2) and result["overall"] > 80
    assert result["num_questions"] == len(truths) and set(result["per_answer_type"]) <= {"yes/no", "number", "other"}
    assert vqa_accuracy({q: "banana" for q in majority}, truths)["overall"] == 0.0


def test_vqa_accuracy_overall_and_per_type():
    @dataclass
    class Truth:
        question_id: int
        answers: tuple[str, ...]
        answer_type: str

    truths = [Truth(1, ("yes",) * 10, "yes/no"), Truth(2, ("2",) * 2 + ("3",) * 8, "number"),
              Truth(3, ("red",) * 10, "other")]
    result = vqa_accuracy({1: "yes", 2: "2", 3: "blue"}, truths)
    assert result["per_answer_type"] == {"number": 60.0, "other": 0.0, "yes/no": 100.0}
    assert result["overall"] == pytest.approx(round(100 * 1.6 / 3, 2))
    with pytest.raises(ValueError, match="no prediction"):
        vqa_accuracy({1: "yes"}, truths)


# ------------------------------------------------------------------------------------------------ captions


def test_caption_scores_hand_computed():
    # METEOR (a Java process loading paraphrase tables, 10-60 s here) is checked in
    # tests/integration/test_caption_meteor.py; the tokenizer is Java too but starts in well under a second.
    gt = {1: ["A blue circle."], 2: ["Two green squares"], 3: ["a yellow triangle", "one yellow triangle"],
          4: ["a purple square"]}
    results = [{"image_id": 1, "caption": "a red circle"}, {"image_id": 2, "caption": "two green squares"},
               {"image_id": 3, "caption": "A yellow triangle."}]
    scores = caption_scores(gt, results, metrics=("Bleu", "ROUGE_L", "CIDEr", "SPICE"))
    # Corpus BLEU-1: clipped matches 2 + 3 + 3 over 9 candidate words, brevity penalty 1 (closest lengths equal).
    assert scores["Bleu_1"] == pytest.approx(8 / 9, abs=1e-4)
    # ROUGE-L per image: LCS 2 of 3 words -> P = R = 2/3 -> F = 2/3; images 2 and 3 -> 1; mean 8/9.
    assert scores["ROUGE_L"] == pytest.approx(8 / 9, abs=1e-4)
    # Only the result image ids are scored (image 4 has no result), as COCOEvalCap does after loadRes.
    assert scores["num_images"] == 3
    assert scores["CIDEr"] > 0 and "METEOR" not in scores
    if scores["SPICE"] is None:
        assert "SPICE" in scores["SPICE_unavailable"]
    else:
        assert 0 <= scores["SPICE"] <= 1


def test_caption_scores_from_files_without_meteor():
    """The fixed files of tests/data (all metrics, METEOR included, are pinned in
    tests/integration/test_caption_files.py against the stock COCOEvalCap)."""
    from pipelines.tasks.metrics import caption_scores_from_files

    data = Path(__file__).resolve().parents[1] / "data"
    scores = caption_scores_from_files(data / "caption_test_results.json", data / "coco_karpathy_test_gt.json",
                                       ("Bleu", "ROUGE_L", "CIDEr"))  # fmt: skip
    assert scores["num_images"] == 3 and "METEOR" not in scores
    assert scores["Bleu_4"] == pytest.approx(0.7368040321632312, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(0.6959098910327063, abs=1e-6)
    assert scores["CIDEr"] == pytest.approx(2.4068030553552417, abs=1e-6)


def test_caption_scores_rejects_bad_results():
    gt = {1: ["a cat"]}
    with pytest.raises(ValueError, match="not in the ground truth"):
        caption_scores(gt, [{"image_id": 9, "caption": "a cat"}])
    with pytest.raises(ValueError, match="duplicate"):
        caption_scores(gt, [{"image_id": 1, "caption": "a cat"}] * 2)
    with pytest.raises(ValueError, match="unknown caption metrics"):
        caption_scores(gt, [{"image_id": 1, "caption": "a cat"}], metrics=("BLEU",))


# -------------------------------------------------------------------------------------- NLVR and writers


def test_nlvr_accuracy():
    assert nlvr_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 50.0
    with pytest.raises(ValueError):
        nlvr_accuracy([1], [1, 0])


def test_result_writers(tmp_path: Path):
    path = write_vqa_results(tmp_path / "vqa_result.json", {5: "yes", 7: "2"})
    assert json.loads(path.read_text()) == [{"question_id": 5, "answer": "yes"}, {"question_id": 7, "answer": "2"}]
    with pytest.raises(ValueError, match="duplicate"):
        write_vqa_results(tmp_path / "bad.json", [(5, "yes"), (5, "no")])
    images = [NoCapsImage("a.jpg", 0), NoCapsImage("b.jpg", 1)]
    path = write_nocaps_results(tmp_path / "nocaps_val.json", {0: "a cat", 1: "a dog"}, images)
    assert json.loads(path.read_text()) == [{"image_id": 0, "caption": "a cat"}, {"image_id": 1, "caption": "a dog"}]
    with pytest.raises(ValueError, match="1 missing"):
        write_nocaps_results(tmp_path / "partial.json", {0: "a cat"}, images)
