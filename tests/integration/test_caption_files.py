"""Caption scoring of a fixed result file against a fixed GT file in the public `coco_karpathy_test_gt.json`
format (tests/data/): the project's file scorer (what `blip eval caption --out` users run) and BLIP's stock path
(pycocotools COCO + pycocoevalcap COCOEvalCap, `coco_caption_eval`) give the same numbers, pinned here.

The pinned values were computed once with the stock scorers (pycocoevalcap 1.2: PTB tokenizer, Bleu(4),
METEOR 1.5 via Java, ROUGE_L, CIDEr-D) on these two files; image 318219 has no result, so, as in BLIP, only the
three result images are scored."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.tasks.metrics import caption_scores_from_files

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DATA = Path(__file__).resolve().parents[1] / "data"
GT_FILE = DATA / "coco_karpathy_test_gt.json"
RESULTS_FILE = DATA / "caption_test_results.json"
EXPECTED = {
    "Bleu_1": 0.9622687142892365,
    "Bleu_2": 0.9194795940331995,
    "Bleu_3": 0.8666096377655593,
    "Bleu_4": 0.7368040321632312,
    "METEOR": 0.3394304665329666,
    "ROUGE_L": 0.6959098910327063,
    "CIDEr": 2.4068030553552417,
}


def test_project_file_scorer_matches_the_pinned_values():
    scores = caption_scores_from_files(RESULTS_FILE, GT_FILE, ("Bleu", "METEOR", "ROUGE_L", "CIDEr"))
    assert scores["num_images"] == 3
    for name, value in EXPECTED.items():
        assert scores[name] == pytest.approx(value, abs=1e-6), name


def test_stock_coco_eval_cap_matches_the_pinned_values(monkeypatch):
    """BLIP's `coco_caption_eval`: COCO(gt).loadRes(results), COCOEvalCap over the result image ids. SPICE is
    replaced by a stub (its CoreNLP models are not here); the other scorers are the stock ones."""
    pytest.importorskip("pycocotools")
    import pycocoevalcap.eval as coco_eval
    from pycocotools.coco import COCO

    class NoSpice:
        def method(self) -> str:
            return "SPICE"

        def compute_score(self, gts: dict, res: dict) -> tuple[float, list[float]]:
            return 0.0, [0.0] * len(gts)

    monkeypatch.setattr(coco_eval, "Spice", NoSpice)
    coco = COCO(str(GT_FILE))
    results = coco.loadRes(str(RESULTS_FILE))
    evaluator = coco_eval.COCOEvalCap(coco, results)
    evaluator.params["image_id"] = results.getImgIds()
    evaluator.evaluate()
    for name, value in EXPECTED.items():
        assert evaluator.eval[name] == pytest.approx(value, abs=1e-6), name


def test_file_scorer_errors_name_the_problem(tmp_path: Path):
    (tmp_path / "results.json").write_text('{"image_id": 1}')
    with pytest.raises(ValueError, match="expected a list"):
        caption_scores_from_files(tmp_path / "results.json", GT_FILE, ("Bleu",))
    (tmp_path / "results.json").write_text('[{"image_id": 7, "caption": "a cat"}]')
    with pytest.raises(ValueError, match="image_id 7 is not in the ground truth"):
        caption_scores_from_files(tmp_path / "results.json", GT_FILE, ("Bleu",))
