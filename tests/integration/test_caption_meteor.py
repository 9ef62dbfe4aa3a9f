"""The full COCO caption scoring (with METEOR's Java process) on a generated Karpathy-style GT file."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.tasks.downstream_data import load_caption_eval, load_coco_caption_gt
from pipelines.tasks.downstream_synth import write_karpathy
from pipelines.tasks.metrics import CAPTION_METRICS, caption_scores

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_all_caption_metrics_on_generated_gt(tmp_path: Path):
    files = write_karpathy(tmp_path, num_train=0, num_val=3, num_test=0, seed=1)
    gt = load_coco_caption_gt(files["coco_karpathy_val_gt"])
    # The first reference as the prediction for image 0, a wrong caption for image 1, image 2 left out.
    first, second = gt.image_ids[:2]
    results = [{"image_id": first, "caption": gt.captions[first][0]},
               {"image_id": second, "caption": "a photo of a dog on the beach"}]
    scores = caption_scores(gt.captions, results)
    assert set(scores) >= {"Bleu_1", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE", "num_images"}
    assert scores["num_images"] == 2 and set(CAPTION_METRICS) <= {k.split("_")[0] if k.startswith("Bleu") else k
                                                                  for k in scores}
    assert 0 < scores["METEOR"] < 1
    # Image 0 is a perfect match, image 1 shares almost nothing: both halves show in the averages.
    assert 0.3 < scores["ROUGE_L"] < 0.8
    if scores["SPICE"] is None:
        assert scores["SPICE_unavailable"]
    assert len(load_caption_eval(files["coco_karpathy_val"])) == 3
