"""Downstream metrics for BLIP (Li et al. 2022): retrieval recall (BLIP `itm_eval`), VQA accuracy (the official
VQA evaluation, re-written from its published description), caption scores (pycocoevalcap), NLVR2 accuracy,
and writers for the VQA and NoCaps evaluation-server result files. See shared/docs/blip_spec.md §4.

Ties in retrieval scores are broken by index (the lower index ranks first), which makes ranks deterministic;
BLIP's `np.argsort(score)[::-1]` breaks them the other way, which only matters for exactly equal scores.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# ------------------------------------------------------------------------------------------------ retrieval


def _as_numpy(matrix: Any) -> Any:
    import numpy as np

    if hasattr(matrix, "detach"):  # a torch tensor
        matrix = matrix.detach().float().cpu().numpy()
    return np.asarray(matrix, dtype=np.float64)


def _ranks(scores: Any, rows: Any, columns: Any, chunk: int = 1024) -> Any:
    """0-based rank of `scores[rows[p], columns[p]]` within its row, for each pair p (stable: ties -> lower index)."""
    import numpy as np

    ranks = np.empty(len(rows), dtype=np.int64)
    positions = np.arange(scores.shape[1])
    for start in range(0, len(rows), chunk):
        row_block = scores[rows[start:start + chunk]]  # (c, N)
        target_columns = columns[start:start + chunk]
        target = row_block[np.arange(len(row_block)), target_columns][:, None]  # (c, 1)
        better = (row_block > target).sum(axis=1)
        tied_before = ((row_block == target) & (positions[None, :] < target_columns[:, None])).sum(axis=1)
        ranks[start:start + chunk] = better + tied_before
    return ranks


def _recalls(ranks: Any, prefix: str) -> dict[str, float]:
    import numpy as np

    result = {f"{prefix}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in (1, 5, 10)}
    result[f"{prefix}_r_mean"] = sum(result.values()) / 3
    result[f"{prefix}_r_median"] = float(np.median(ranks + 1))  # MdR, 1-based (BLIP video eval)
    return result


def itm_eval(score_i2t: Any, score_t2i: Any, txt2img: Sequence[int],
             img2txt: Sequence[Sequence[int]]) -> dict[str, float]:
    """BLIP's retrieval metrics. score_i2t: (N_img, N_txt); score_t2i: (N_txt, N_img) (numpy or torch).

    Image→text rank = best (lowest) rank among the image's ground-truth captions; text→image rank = rank of its
    one image. `txt_r{1,5,10}` (text retrieval) and `img_r{1,5,10}` (image retrieval) are percentages with
    rank < K; `*_r_mean` averages the three; `r_mean` averages the two means; `*_r_median` is the median rank
    (1-based, the video MdR metric)."""
    import numpy as np

    score_i2t, score_t2i = _as_numpy(score_i2t), _as_numpy(score_t2i)
    num_images, num_texts = score_i2t.shape
    if score_t2i.shape != (num_texts, num_images):
        raise ValueError(f"score_t2i has shape {score_t2i.shape}, expected {(num_texts, num_images)}")
    if len(img2txt) != num_images or len(txt2img) != num_texts:
        raise ValueError(f"img2txt has {len(img2txt)} rows for {num_images} images and txt2img {len(txt2img)} "
                         f"for {num_texts} texts")
    if any(len(texts) == 0 for texts in img2txt):
        raise ValueError("every image needs at least one ground-truth caption in img2txt")
    pair_images = np.repeat(np.arange(num_images), [len(texts) for texts in img2txt])
    pair_texts = np.fromiter((t for texts in img2txt for t in texts), dtype=np.int64, count=len(pair_images))
    pair_ranks = _ranks(score_i2t, pair_images, pair_texts)
    i2t_ranks = np.full(num_images, np.iinfo(np.int64).max)
    np.minimum.at(i2t_ranks, pair_images, pair_ranks)
    t2i_ranks = _ranks(score_t2i, np.arange(num_texts), np.asarray(txt2img, dtype=np.int64))
    result = _recalls(i2t_ranks, "txt") | _recalls(t2i_ranks, "img")
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


# ----------------------------------------------------------------------------------------------------- VQA
# Answer normalisation of the official VQA evaluation (visualqa.org/evaluation): lower-case, strip punctuation,
# number words -> digits, drop articles, restore apostrophes in contractions. Tables written for this project.

_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe -> the canonical spelling.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldn'tve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hedve": "he'd've",
    "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "id've": "i'd've", "idve": "i'd've", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itdve": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "lets": "let's", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "shant": "shan't", "shed've": "she'd've", "shedve": "she'd've",
    "she'dve": "she'd've", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "somebodyd": "somebody'd", "somebodys": "somebody's", "someoned": "someone'd", "someones": "someone's",
    "somethingd": "something'd", "somethings": "something's", "thered": "there'd", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "wedve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
# Punctuation removed (or turned into a space when it glues two words together, e.g. "black/white").
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
                "!")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# The official pattern is "(?!<=\d)(\.)(?!\d)", whose first group is a (no-op) lookahead, so in effect every
# period not followed by a digit goes ("2.5" stays, "5." and "st." lose it); we keep that behaviour.
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")


def _strip_punctuation(text: str) -> str:
    result = text
    for mark in _PUNCTUATION:
        # A mark next to a space (or a thousands comma) disappears; one inside a token becomes a space.
        if f"{mark} " in text or f" {mark}" in text or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return _PERIOD_NOT_DECIMAL.sub("", result)


def _digits_and_articles(text: str) -> str:
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def normalize_vqa_answer(answer: str) -> str:
    """The full VQA answer normalisation (whitespace, punctuation, number words, articles, contractions)."""
    return _digits_and_articles(_strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()))


def vqa_question_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction: mean over the 10 leave-one-out subsets of min(1, #matching humans / 3).

    As in the official tool, answers are normalised only when the human answers disagree; when all humans agree
    only whitespace is cleaned (so "two" vs ten "2" scores 0 there, as it does on the evaluation server)."""
    if not human_answers:
        raise ValueError("a VQA question needs human answers to be scored")
    answers = [answer.replace("\n", " ").replace("\t", " ").strip() for answer in human_answers]
    predicted = prediction.replace("\n", " ").replace("\t", " ").strip()
    if len(set(answers)) > 1:
        answers = [normalize_vqa_answer(answer) for answer in answers]
        predicted = normalize_vqa_answer(predicted)
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for j, answer in enumerate(answers) if j != left_out and answer == predicted)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


def vqa_accuracy(predictions: Mapping[int, str], ground_truth: Sequence[Any]) -> dict[str, Any]:
    """Overall and per-answer-type VQA accuracy (percent, 2 decimals like the official tool).

    `ground_truth` items need `question_id`, `answers` and optionally `answer_type` (e.g. `VQAGroundTruth`);
    every ground-truth question must have a prediction."""
    missing = [truth.question_id for truth in ground_truth if truth.question_id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} questions have no prediction (first: {missing[:5]})")
    per_type: dict[str, list[float]] = {}
    overall = []
    for truth in ground_truth:
        accuracy = vqa_question_accuracy(predictions[truth.question_id], truth.answers)
        overall.append(accuracy)
        per_type.setdefault(getattr(truth, "answer_type", None) or "unknown", []).append(accuracy)
    if not overall:
        raise ValueError("no questions to score")
    return {
        "overall": round(100 * sum(overall) / len(overall), 2),
        "per_answer_type": {kind: round(100 * sum(v) / len(v), 2) for kind, v in sorted(per_type.items())},
        "num_questions": len(overall),
    }


# ------------------------------------------------------------------------------------------------ captions


def _spice_unavailable_reason() -> str | None:
    """Why SPICE cannot run here, or None. pycocoevalcap's SPICE needs the Stanford CoreNLP 3.6.0 jars and
    downloads them on first use; without them (and without internet) it would hang or fail, so check first."""
    import shutil

    from pycocoevalcap.spice import get_stanford_models

    jar = Path(get_stanford_models.SPICEDIR) / get_stanford_models.SPICELIB / f"{get_stanford_models.JAR}.jar"
    if not jar.exists():
        return f"SPICE needs the Stanford CoreNLP 3.6.0 models at {jar}, which are absent (downloaded on demand)"
    if shutil.which("java") is None:
        return "SPICE needs java on PATH"
    return None


CAPTION_METRICS = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


def _validated_predictions(gt_captions: Mapping[int, Sequence[str]],
                           results: Sequence[Mapping[str, Any]]) -> dict[int, str]:
    predictions: dict[int, str] = {}
    for index, result in enumerate(results):
        image_id, caption = result.get("image_id"), result.get("caption")
        if not isinstance(image_id, int) or not isinstance(caption, str):
            raise ValueError(f"result {index}: expected {{'image_id': int, 'caption': str}}, got {result!r:.80}")
        if image_id not in gt_captions:
            raise ValueError(f"result {index}: image_id {image_id} is not in the ground truth")
        if image_id in predictions:
            raise ValueError(f"result {index}: duplicate image_id {image_id}")
        predictions[image_id] = caption
    if not predictions:
        raise ValueError("no caption results to score")
    return predictions


def _meteor(references: dict[int, list[str]], candidates: dict[int, list[str]]) -> float:
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()  # a Java process (loads paraphrase tables: ~10 s, more on a busy machine); ended here
    try:
        return float(meteor.compute_score(references, candidates)[0])
    finally:
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()


def _spice(references: dict[int, list[str]], candidates: dict[int, list[str]]) -> tuple[float | None, str | None]:
    reason = _spice_unavailable_reason()
    if reason is not None:
        return None, reason
    try:
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(references, candidates)[0]), None
    except Exception as error:  # the Java scorer fails in many ways; report it, never a made-up number
        return None, f"SPICE failed: {type(error).__name__}: {error}"


def caption_scores(gt_captions: Mapping[int, Sequence[str]], results: Sequence[Mapping[str, Any]],
                   metrics: Sequence[str] = CAPTION_METRICS) -> dict[str, Any]:
    """COCO caption metrics for `results` (`[{"image_id", "caption"}]`) against `gt_captions` (image id ->
    references, e.g. `load_coco_caption_gt(path).captions`), as BLIP scores them with COCOEvalCap: PTB-tokenised,
    Bleu_1..4, METEOR, ROUGE_L, CIDEr over the result image ids only. SPICE is added when it can run; otherwise
    `"SPICE": None` and `"SPICE_unavailable"` gives the reason. `metrics` selects a subset of CAPTION_METRICS."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    unknown = sorted(set(metrics) - set(CAPTION_METRICS))
    if unknown:
        raise ValueError(f"unknown caption metrics {unknown}; choose from {CAPTION_METRICS}")
    predictions = _validated_predictions(gt_captions, results)
    tokenizer = PTBTokenizer()
    references = tokenizer.tokenize({i: [{"caption": c} for c in gt_captions[i]] for i in predictions})
    candidates = tokenizer.tokenize({i: [{"caption": c}] for i, c in predictions.items()})
    scores: dict[str, Any] = {}
    if "Bleu" in metrics:
        with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its n-gram statistics
            bleu, _ = Bleu(4).compute_score(references, candidates)
        scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
    if "METEOR" in metrics:
        scores["METEOR"] = _meteor(references, candidates)
    if "ROUGE_L" in metrics:
        scores["ROUGE_L"] = float(Rouge().compute_score(references, candidates)[0])
    if "CIDEr" in metrics:
        scores["CIDEr"] = float(Cider().compute_score(references, candidates)[0])
    if "SPICE" in metrics:
        scores["SPICE"], reason = _spice(references, candidates)
        if reason is not None:
            scores["SPICE_unavailable"] = reason
    scores["num_images"] = len(predictions)
    return scores


def caption_scores_from_files(results_path: str | Path, gt_path: str | Path,
                              metrics: Sequence[str] = CAPTION_METRICS) -> dict[str, Any]:
    """`caption_scores` of a result file (`[{"image_id", "caption"}]`, e.g. `caption_test_results.json` of an
    evaluation) against a COCO-format GT file (`coco_karpathy_test_gt.json`), over the result's image ids only:
    what BLIP's `coco_caption_eval` computes with pycocotools' COCO + COCOEvalCap, without pycocotools."""
    from pipelines.tasks.downstream_data import load_coco_caption_gt

    results = json.loads(Path(results_path).read_text(encoding="utf-8"))
    if not isinstance(results, list):
        raise ValueError(f"{results_path}: expected a list of {{'image_id', 'caption'}}, got {type(results).__name__}")
    return caption_scores(load_coco_caption_gt(gt_path).captions, results, metrics)


# ---------------------------------------------------------------------------------------------------- NLVR


def nlvr_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Percent of NLVR2 pairs whose predicted label (0 = False, 1 = True) equals the gold label."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no NLVR2 pairs to score")
    return 100.0 * sum(int(p) == int(t) for p, t in zip(predictions, labels)) / len(labels)


# ------------------------------------------------------------------------------------------ result writers


def _write_json_atomic(path: str | Path, payload: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload))
    temporary.replace(path)
    return path


def write_vqa_results(path: str | Path, answers: Mapping[int, str] | Sequence[tuple[int, str]]) -> Path:
    """The VQA test-dev/test-std server file: `[{"question_id": int, "answer": str}]`, one per question."""
    pairs = list(answers.items()) if isinstance(answers, Mapping) else list(answers)
    seen: set[int] = set()
    for question_id, answer in pairs:
        if not isinstance(question_id, int) or isinstance(question_id, bool) or not isinstance(answer, str):
            raise ValueError(f"expected (int question_id, str answer), got {(question_id, answer)!r:.80}")
        if question_id in seen:
            raise ValueError(f"duplicate question_id {question_id}")
        seen.add(question_id)
    return _write_json_atomic(path, [{"question_id": q, "answer": a} for q, a in pairs])


def write_caption_results(path: str | Path, captions: Mapping[int, str] | Sequence[tuple[int, str]],
                          expected_ids: Sequence[int] | None = None) -> Path:
    """A caption result file in the COCO / NoCaps server format: `[{"image_id": int, "caption": str}]`.

    For NoCaps pass `expected_ids` (every `img_id` of the split): the server wants exactly one caption each."""
    pairs = list(captions.items()) if isinstance(captions, Mapping) else list(captions)
    ids = [image_id for image_id, _ in pairs]
    for image_id, caption in pairs:
        if not isinstance(image_id, int) or isinstance(image_id, bool) or not isinstance(caption, str):
            raise ValueError(f"expected (int image_id, str caption), got {(image_id, caption)!r:.80}")
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate image_id in caption results")
    if expected_ids is not None and set(ids) != set(expected_ids):
        missing, extra = set(expected_ids) - set(ids), set(ids) - set(expected_ids)
        raise ValueError(f"caption results do not cover the split: {len(missing)} missing "
                         f"(first {sorted(missing)[:5]}), {len(extra)} unknown (first {sorted(extra)[:5]})")
    return _write_json_atomic(path, [{"image_id": i, "caption": c} for i, c in pairs])


def write_nocaps_results(path: str | Path, captions: Mapping[int, str] | Sequence[tuple[int, str]],
                         images: Sequence[Any]) -> Path:
    """NoCaps server submission for the split whose `NoCapsImage` records are `images`."""
    return write_caption_results(path, captions, expected_ids=[image.img_id for image in images])
