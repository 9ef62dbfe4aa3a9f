"""Annotation loaders for BLIP's downstream tasks (Li et al. 2022), in the exact public schemas.

Follows salesforce/BLIP `data/coco_karpathy_dataset.py`, `flickr30k_dataset.py`, `vqa_dataset.py`,
`nlvr_dataset.py`, `video_dataset.py`, `nocaps_dataset.py` and the LAVIS builders (shared/docs/blip_spec.md §4,
§8.2). Every file is validated record by record: a malformed file raises `AnnotationError` naming the file, the
record index and the field. Records are typed frozen dataclasses; the derived structures (eval text lists,
img2txt/txt2img, VQA answer weights, NLVR labels) are built as BLIP builds them.

Synthetic datasets written in these same schemas live in `downstream_synth.py`.
"""

from __future__ import annotations

import contextlib
import json
import random
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_models.processing import pre_caption, pre_question

# BLIP's eval datasets truncate captions to 30 words (retrieval/caption) and NLVR sentences to 40.
RETRIEVAL_MAX_WORDS = 30
NLVR_MAX_WORDS = 40
VG_ANSWER_WEIGHT = 0.2  # BLIP vqa_dataset.py: every Visual Genome answer gets weight 0.2
NLVR_LABELS = {"False": 0, "True": 1}


class AnnotationError(ValueError):
    """An annotation file that does not follow its public schema; the message names file, record and field."""

    def __init__(self, path: str | Path, message: str, index: int | None = None, field: str | None = None):
        where = str(path) + (f": record {index}" if index is not None else "") + (f": field '{field}'" if field else "")
        super().__init__(f"{where}: {message}")
        self.path, self.index, self.field = str(path), index, field


# ------------------------------------------------------------------------------------------------ reading


def _read_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, "annotation file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise AnnotationError(path, f"not valid JSON: {error}") from error


def _read_list(path: str | Path) -> list[Any]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise AnnotationError(path, f"expected a JSON list of records, got {type(data).__name__}")
    return data


def _read_jsonl(path: str | Path) -> list[Any]:
    path = Path(path)
    if not path.exists():
        raise AnnotationError(path, "annotation file not found")
    records = []
    for line_number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise AnnotationError(path, f"line {line_number + 1} is not valid JSON: {error}") from error
    return records


def _field(path: str | Path, index: int, record: Any, name: str, kind: type | tuple[type, ...]) -> Any:
    """`record[name]`, checked to be present and of type `kind` (bool is never accepted as int)."""
    if not isinstance(record, dict):
        raise AnnotationError(path, f"expected an object, got {type(record).__name__}", index)
    if name not in record:
        raise AnnotationError(path, "missing", index, name)
    value = record[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = "/".join(k.__name__ for k in kinds)
        raise AnnotationError(path, f"expected {expected}, got {type(value).__name__} {value!r:.60}", index, name)
    return value


def _string_list(path: str | Path, index: int, record: Any, name: str) -> tuple[str, ...]:
    values = _field(path, index, record, name, list)
    if not values or not all(isinstance(v, str) for v in values):
        raise AnnotationError(path, "expected a non-empty list of strings", index, name)
    return tuple(values)


# ------------------------------------------------------------------------------ retrieval and captioning


@dataclass(frozen=True, slots=True)
class CaptionPair:
    """One Karpathy/Flickr train item: `{"image", "caption", "image_id"}` (image_id shared by an image's captions)."""

    image: str
    caption: str
    image_id: str


@dataclass(frozen=True, slots=True)
class CaptionedImage:
    """One Karpathy/Flickr val/test item: `{"image", "caption": [captions]}`."""

    image: str
    captions: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class RetrievalEvalSet:
    """What BLIP's `*_retrieval_eval` dataset builds: flattened (cleaned) texts and the two index maps."""

    images: tuple[str, ...]
    texts: tuple[str, ...]
    img2txt: tuple[tuple[int, ...], ...]  # image index -> its caption indices
    txt2img: tuple[int, ...]  # caption index -> its image index


def load_caption_train(path: str | Path) -> list[CaptionPair]:
    """`coco_karpathy_train.json` / `flickr30k_train.json`: list of one-caption items."""
    records = _read_list(path)
    pairs = []
    for index, record in enumerate(records):
        image_id = _field(path, index, record, "image_id", (str, int))
        pairs.append(CaptionPair(_field(path, index, record, "image", str), _field(path, index, record, "caption", str),
                                 str(image_id)))
    return pairs


def load_caption_pairs(path: str | Path) -> list[CaptionPair]:
    """BLIP's pretraining pair files (`vg_caption.json`, or any `{"image", "caption"}` list; spec §2.3): one
    caption per item; `image_id` is optional and defaults to the image path (an image's captions share it)."""
    pairs = []
    for index, record in enumerate(_read_list(path)):
        image = _field(path, index, record, "image", str)
        has_id = isinstance(record, dict) and "image_id" in record
        image_id = _field(path, index, record, "image_id", (str, int)) if has_id else image
        pairs.append(CaptionPair(image, _field(path, index, record, "caption", str), str(image_id)))
    return pairs


def load_caption_eval(path: str | Path) -> list[CaptionedImage]:
    """`coco_karpathy_{val,test}.json` / `flickr30k_{val,test}.json`: list of per-image items with caption lists."""
    records = _read_list(path)
    return [CaptionedImage(_field(path, index, record, "image", str), _string_list(path, index, record, "caption"))
            for index, record in enumerate(records)]


def consecutive_image_ids(pairs: Sequence[CaptionPair]) -> list[int]:
    """BLIP's train `img_ids`: each distinct `image_id` gets a consecutive int in order of first appearance;
    the ITC loss uses it to treat captions of the same image as positives."""
    mapping: dict[str, int] = {}
    return [mapping.setdefault(pair.image_id, len(mapping)) for pair in pairs]


def caption_train_text(pair: CaptionPair, prompt: str = "a picture of ", max_words: int = RETRIEVAL_MAX_WORDS) -> str:
    """The captioning train target: `prompt + pre_caption(caption, 30)` (BLIP coco_karpathy_train with a prompt;
    retrieval training uses `prompt=""`)."""
    return prompt + pre_caption(pair.caption, max_words)


def build_retrieval_eval(items: Sequence[CaptionedImage], max_words: int = RETRIEVAL_MAX_WORDS) -> RetrievalEvalSet:
    """Flatten captions in file order (pre_caption'd) and build img2txt / txt2img as BLIP's eval dataset does."""
    texts: list[str] = []
    img2txt: list[tuple[int, ...]] = []
    txt2img: list[int] = []
    for image_index, item in enumerate(items):
        first = len(texts)
        texts.extend(pre_caption(caption, max_words) for caption in item.captions)
        img2txt.append(tuple(range(first, len(texts))))
        txt2img.extend([image_index] * len(item.captions))
    return RetrievalEvalSet(tuple(item.image for item in items), tuple(texts), tuple(img2txt), tuple(txt2img))


def coco_image_id(image_path: str) -> int:
    """Integer COCO id from a Karpathy image path (`val2014/COCO_val2014_000000391895.jpg` -> 391895), as BLIP's
    caption eval dataset parses it for the result file."""
    stem = Path(image_path).stem
    digits = stem.rsplit("_", 1)[-1]
    if not digits.isdigit():
        raise ValueError(f"cannot parse a COCO image id from {image_path!r} (expected ..._<digits>.jpg)")
    return int(digits)


@dataclass(frozen=True, slots=True)
class CocoCaptionGT:
    """A COCO-caption-format ground-truth file: image ids and their reference captions."""

    image_ids: tuple[int, ...]
    captions: dict[int, tuple[str, ...]]  # image id -> reference captions, file order


def load_coco_caption_gt(path: str | Path) -> CocoCaptionGT:
    """`coco_karpathy_{val,test}_gt.json`: `{"images": [{"id"}], "annotations": [{"image_id","caption","id"}]}`."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(path, f"expected an object with 'images' and 'annotations', got {type(data).__name__}")
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(path, "missing or not a list", None, key)
    image_ids = tuple(_field(path, index, image, "id", int) for index, image in enumerate(data["images"]))
    known = set(image_ids)
    captions: dict[int, list[str]] = {image_id: [] for image_id in image_ids}
    for index, annotation in enumerate(data["annotations"]):
        image_id = _field(path, index, annotation, "image_id", int)
        _field(path, index, annotation, "id", int)
        if image_id not in known:
            raise AnnotationError(path, f"annotations[{index}] refers to image_id {image_id} not listed in 'images'")
        captions[image_id].append(_field(path, index, annotation, "caption", str))
    return CocoCaptionGT(image_ids, {key: tuple(value) for key, value in captions.items()})


@dataclass(frozen=True, slots=True)
class NoCapsImage:
    """One `nocaps_{val,test}.json` item: `{"image", "img_id"}`."""

    image: str
    img_id: int


def load_nocaps(path: str | Path) -> list[NoCapsImage]:
    records = _read_list(path)
    return [NoCapsImage(_field(path, index, record, "image", str), _field(path, index, record, "img_id", int))
            for index, record in enumerate(records)]


# --------------------------------------------------------------------------------------------------- VQA


@dataclass(frozen=True, slots=True)
class VQAQuestion:
    """One BLIP/LAVIS VQA item. `dataset` is "vqa" (10 human answers), "vg" (one answer) or "test" (no answer).
    `question_id` is None only for VG items that carry none (BLIP never reads it for training)."""

    question_id: int | None
    question: str
    image: str
    answers: tuple[str, ...]
    dataset: str


def load_vqa(path: str | Path, split: str = "train") -> list[VQAQuestion]:
    """`vqa_train.json`, `vqa_val.json`, `vg_qa.json` (split "train") or `vqa_test.json` (split "test")."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    records = _read_list(path)
    questions = []
    for index, record in enumerate(records):
        question = _field(path, index, record, "question", str)
        image = _field(path, index, record, "image", str)
        if split == "test":
            question_id = _field(path, index, record, "question_id", int)
            questions.append(VQAQuestion(question_id, question, image, (), "test"))
            continue
        dataset = _field(path, index, record, "dataset", str)
        if dataset == "vqa":
            questions.append(VQAQuestion(_field(path, index, record, "question_id", int), question, image,
                                         _string_list(path, index, record, "answer"), "vqa"))
        elif dataset == "vg":
            question_id = record.get("question_id")
            if question_id is not None and (not isinstance(question_id, int) or isinstance(question_id, bool)):
                raise AnnotationError(path, f"expected int, got {question_id!r:.60}", index, "question_id")
            questions.append(VQAQuestion(question_id, question, image,
                                         (_field(path, index, record, "answer", str),), "vg"))
        else:
            raise AnnotationError(path, f"expected 'vqa' or 'vg', got {dataset!r:.60}", index, "dataset")
    return questions


def vqa_answer_weights(question: VQAQuestion) -> dict[str, float]:
    """BLIP's answer weights: VQA -> each distinct answer gets count/len(answers); VG -> 0.2 for its one answer."""
    if question.dataset == "vg":
        return {question.answers[0]: VG_ANSWER_WEIGHT}
    if question.dataset != "vqa":
        raise ValueError(f"question {question.question_id} ({question.dataset}) has no training answers")
    weights: dict[str, float] = {}
    for answer in question.answers:
        weights[answer] = weights.get(answer, 0.0) + 1.0 / len(question.answers)
    return weights


def vqa_train_example(question: VQAQuestion) -> tuple[str, list[str], list[float]]:
    """(pre_question'd question, answers, weights) — what BLIP's VQA train dataset returns per item."""
    weights = vqa_answer_weights(question)
    return pre_question(question.question), list(weights), list(weights.values())


def load_answer_list(path: str | Path) -> list[str]:
    """`answer_list.json`: the candidate answers for rank inference (a JSON list of strings, no duplicates)."""
    answers = _read_list(path)
    for index, answer in enumerate(answers):
        if not isinstance(answer, str):
            raise AnnotationError(path, f"expected a string answer, got {type(answer).__name__}", index)
    if len(set(answers)) != len(answers):
        raise AnnotationError(path, "duplicate answers in the answer list")
    return answers


@dataclass(frozen=True, slots=True)
class VQAGroundTruth:
    """One question from the official VQA v2 questions + annotations files (what the VQA eval tool reads)."""

    question_id: int
    image_id: int
    question: str
    answer_type: str  # "yes/no" | "number" | "other"
    answers: tuple[str, ...]  # the 10 human answers


def load_vqa_official(questions_path: str | Path, annotations_path: str | Path) -> list[VQAGroundTruth]:
    """`v2_OpenEnded_mscoco_*_questions.json` (`{"questions":[{image_id,question,question_id}]}`) and
    `v2_mscoco_*_annotations.json` (`{"annotations":[{question_id,image_id,answer_type,answers:[{answer,...}]}]}`)."""
    texts: dict[int, str] = {}
    for key, path in (("questions", questions_path), ("annotations", annotations_path)):
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise AnnotationError(path, f"expected an object with a '{key}' list", None, key)
    for index, record in enumerate(_read_json(questions_path)["questions"]):
        texts[_field(questions_path, index, record, "question_id", int)] = _field(
            questions_path, index, record, "question", str)
    truths = []
    for index, record in enumerate(_read_json(annotations_path)["annotations"]):
        question_id = _field(annotations_path, index, record, "question_id", int)
        answers = _field(annotations_path, index, record, "answers", list)
        if question_id not in texts:
            raise AnnotationError(annotations_path, f"question_id {question_id} not in {questions_path}", index)
        answer_texts = tuple(_field(annotations_path, index, answer, "answer", str) for answer in answers)
        if not answer_texts:
            raise AnnotationError(annotations_path, "empty answer list", index, "answers")
        truths.append(VQAGroundTruth(question_id, _field(annotations_path, index, record, "image_id", int),
                                     texts[question_id], _field(annotations_path, index, record, "answer_type", str),
                                     answer_texts))
    return truths


# ------------------------------------------------------------------------------------------------- NLVR2


@dataclass(frozen=True, slots=True)
class NLVRPair:
    """One `nlvr_{train,dev,test}.json` item: two images, a sentence and label "True" (1) / "False" (0)."""

    images: tuple[str, str]
    sentence: str
    label: int


def load_nlvr(path: str | Path) -> list[NLVRPair]:
    records = _read_list(path)
    pairs = []
    for index, record in enumerate(records):
        images = _string_list(path, index, record, "images")
        if len(images) != 2:
            raise AnnotationError(path, f"expected exactly 2 images [left, right], got {len(images)}", index, "images")
        label = _field(path, index, record, "label", str)
        if label not in NLVR_LABELS:
            raise AnnotationError(path, f"expected 'True' or 'False', got {label!r:.60}", index, "label")
        pairs.append(NLVRPair((images[0], images[1]), _field(path, index, record, "sentence", str), NLVR_LABELS[label]))
    return pairs


def nlvr_train_swap(pair: NLVRPair, rng: random.Random) -> tuple[str, str, str]:
    """BLIP's NLVR2 train augmentation -> (left image, right image, cleaned sentence). With p=0.5 the images swap;
    when the sentence mentions left/right the words swap with them so the label stays true."""
    sentence = pre_caption(pair.sentence, NLVR_MAX_WORDS)
    left, right = pair.images
    mentions_side = "left" in sentence or "right" in sentence
    if rng.random() < 0.5:
        left, right = right, left
        if mentions_side:
            sentence = sentence.replace("left", "\0").replace("right", "left").replace("\0", "right")
    return left, right, sentence


# ------------------------------------------------------------------------------------------------ MSRVTT


@dataclass(frozen=True, slots=True)
class VideoCaption:
    """One `msrvtt_test.jsonl` line: `{"clip_name", "caption"}`; the video is `<video_root>/<clip_name>.mp4`."""

    clip_name: str
    caption: str


def load_msrvtt(path: str | Path) -> list[VideoCaption]:
    records = _read_jsonl(path)
    return [VideoCaption(_field(path, index, record, "clip_name", str), _field(path, index, record, "caption", str))
            for index, record in enumerate(records)]


def video_frame_indices(num_video_frames: int, num_frames: int) -> list[int]:
    """Uniform sampling: frame int(i * vlen / num_frm) for i < num_frm.

    BLIP writes `np.arange(0, vlen, vlen / num_frm, dtype=int)`, which is the same when num_frm divides vlen; otherwise
    numpy's integer arange steps by int(vlen / num_frm) (300 frames: 0, 37, ..., 259, never the last seconds; fewer
    frames than num_frm: frame 0 every time). We keep the uniform spacing BLIP describes."""
    return [int(step * num_video_frames / num_frames) for step in range(num_frames)]


def read_video_frames(path: str | Path, num_frames: int = 8, size: int | None = None) -> list[Any]:
    """`num_frames` uniformly spaced RGB frames (PIL images) of a video (a path or an fsspec URL), optionally
    resized to size×size.

    BLIP decodes with decord; decord is not installed here, so OpenCV reads the frames of `video_frame_indices`.
    Only the wanted frames are kept: the frames between them are skipped with `grab()` (decoded by the codec but
    never converted to RGB nor held in memory), which stays frame-exact where seeking (CAP_PROP_POS_FRAMES) can land
    on the wrong frame with some codecs. A container whose frame
    count is missing or wrong is read once more to count its decodable frames."""
    import cv2
    from PIL import Image

    with _local_file(path) as local:
        frames = _read_frames(local, num_frames, str(path))
    images = [Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)) for frame in frames]
    if size is not None:
        images = [image.resize((size, size), Image.BICUBIC) for image in images]
    return images


@contextlib.contextmanager
def _local_file(path: str | Path) -> Iterator[str]:
    """A local path for `path`: itself when local, else a temporary copy of the fsspec URL (OpenCV reads only
    local files; evaluation workers on other nodes get registry URLs, not the driver's paths)."""
    from fsspec.implementations.local import LocalFileSystem

    from datasets_manifests.filesystems import url_to_fs

    fs, fs_path = url_to_fs(str(path))
    if isinstance(fs, LocalFileSystem):
        yield fs_path
        return
    with tempfile.NamedTemporaryFile(suffix=Path(fs_path).suffix) as copy:
        fs.get_file(fs_path, copy.name)
        yield copy.name


def _read_frames(local: str, num_frames: int, name: str) -> list[Any]:
    """BGR frames of `video_frame_indices` from a local video file; `name` is what errors call it."""
    import cv2

    capture = cv2.VideoCapture(local)
    if not capture.isOpened():
        raise ValueError(f"{name}: cannot open video")
    try:
        length = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        frames = _grab_frames(capture, video_frame_indices(length, num_frames)) if length > 0 else []
    finally:
        capture.release()
    if len(frames) < num_frames:  # the header's count was wrong: count the frames, then read again
        capture = cv2.VideoCapture(local)
        try:
            length = 0
            while capture.grab():
                length += 1
        finally:
            capture.release()
        if length == 0:
            raise ValueError(f"{name}: video has no decodable frames")
        capture = cv2.VideoCapture(local)
        try:
            frames = _grab_frames(capture, video_frame_indices(length, num_frames))
        finally:
            capture.release()
    return frames


def _grab_frames(capture: Any, indices: list[int]) -> list[Any]:
    """The frames at `indices` (ascending, repeats allowed) of an open capture; fewer if the video ends first."""
    frames: list[Any] = []
    position, frame = -1, None
    for index in indices:
        while position < index:
            if not capture.grab():
                return frames
            position += 1
            frame = None
        if frame is None:
            ok, frame = capture.retrieve()
            if not ok:
                return frames
        frames.append(frame)
    return frames
