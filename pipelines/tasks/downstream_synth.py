"""Small synthetic downstream datasets in the exact public BLIP annotation schemas (shared/docs/blip_spec.md §4,
§8.2), rendered from shape scenes with known ground truth, so finetuning and evaluation run end to end offline.

Each `write_*` function writes images (or videos) and the annotation files a user would download for the real
benchmark, with the real file names and record layouts: Karpathy COCO / Flickr30k (retrieval and captioning,
with COCO-caption GT files), VQAv2 as BLIP/LAVIS ship it (+ VG QA, answer_list.json, the official val questions
and annotations), NLVR2, MSRVTT (`msrvtt_test.jsonl` + mp4 clips) and NoCaps. Everything is seeded.

Scenes use the vocabulary of the pretraining demo corpus (`demo_corpus.SHAPES`, `COLOURS`, `BACKGROUNDS`), so a
model pretrained there meets the same words downstream, and every shape is drawn by the demo generator's
`demo_corpus.draw_shape`. Only the scene layout is this module's own: downstream tasks need several different
shapes per image (colour/shape questions, NLVR2 comparisons), while a demo-corpus scene holds one kind of shape.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.tasks.demo_corpus import BACKGROUNDS, COLOURS, SHAPES, draw_shape

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")


@dataclass(frozen=True, slots=True)
class Shape:
    kind: str  # one of SHAPES (circle, square, triangle, star, diamond)
    colour: str  # a key of COLOURS
    centre: tuple[float, float]  # fractions of the image side, (x, y)
    radius: float  # fraction of the image side


@dataclass(frozen=True, slots=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str  # a key of BACKGROUNDS


def random_scene(rng: random.Random, max_shapes: int = 3) -> Scene:
    """1..max_shapes non-overlapping shapes, one per cell of a 3×3 grid, none coloured like the background."""
    background = rng.choice(list(BACKGROUNDS))
    colours = [colour for colour in COLOURS if colour != background]
    cells = rng.sample(range(9), rng.randint(1, min(max_shapes, 9)))
    shapes = tuple(
        Shape(rng.choice(SHAPES), rng.choice(colours),
              ((cell % 3 + 0.5 + rng.uniform(-0.1, 0.1)) / 3, (cell // 3 + 0.5 + rng.uniform(-0.1, 0.1)) / 3),
              rng.uniform(0.09, 0.13))
        for cell in cells)
    return Scene(shapes, background)


def render_scene(scene: Scene, size: int = 64) -> Any:
    """The scene as a size×size RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        draw_shape(draw, shape.kind, shape.centre[0] * size, shape.centre[1] * size, shape.radius * size,
                   COLOURS[shape.colour])
    return image


def _plural(kind: str, count: int) -> str:
    return kind if count == 1 else kind + "s"


def describe(scene: Scene, rng: random.Random) -> str:
    """One true English description, e.g. 'two red circles and a blue square', groups in random order."""
    groups = list(Counter((shape.colour, shape.kind) for shape in scene.shapes).items())
    rng.shuffle(groups)
    phrases = [f"{'a' if n == 1 else NUMBER_WORDS[n]} {colour} {_plural(kind, n)}" for (colour, kind), n in groups]
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_CAPTION_TEMPLATES = ("{objects}.", "A picture of {objects}.", "There is {objects} on a {background} background.",
                      "An image showing {objects}.", "{objects} drawn on {background}.")


def scene_captions(scene: Scene, rng: random.Random, count: int = 5) -> list[str]:
    """`count` different human-style captions of the scene (cycling through templates)."""
    return [_CAPTION_TEMPLATES[i % len(_CAPTION_TEMPLATES)].format(objects=describe(scene, rng),
                                                                   background=scene.background).capitalize()
            for i in range(count)]


def _write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
    return path


def _save_image(root: Path, relative: str, scene: Scene, size: int) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    render_scene(scene, size).save(path, quality=95)


# ------------------------------------------------------------------------------ retrieval and captioning


def write_karpathy(root: str | Path, style: str = "coco", num_train: int = 16, num_val: int = 8, num_test: int = 8,
                   captions_per_image: int = 5, image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """Karpathy-split retrieval/captioning data: `coco_karpathy_{train,val,test}.json` (+ `_{val,test}_gt.json`)
    with images `train2014|val2014/COCO_<split>2014_<id:012d>.jpg`, or `flickr30k_{train,val,test}.json` with
    images `flickr30k-images/<id>.jpg`. Returns the annotation paths by name."""
    if style not in ("coco", "flickr"):
        raise ValueError(f"style must be 'coco' or 'flickr', got {style!r}")
    root, rng = Path(root), random.Random(seed)
    prefix = "coco_karpathy" if style == "coco" else "flickr30k"
    written: dict[str, Path] = {}
    next_id = 1000
    for split, count in (("train", num_train), ("val", num_val), ("test", num_test)):
        train_items, eval_items, gt_images, gt_annotations = [], [], [], []
        for _ in range(count):
            image_id, next_id = next_id, next_id + 1
            if style == "coco":
                folder = "train2014" if split == "train" else "val2014"
                image = f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
            else:
                image = f"flickr30k-images/{image_id}.jpg"
            scene = random_scene(rng)
            _save_image(root, image, scene, image_size)
            captions = scene_captions(scene, rng, captions_per_image)
            if split == "train":
                key = f"coco_{image_id}" if style == "coco" else str(image_id)
                train_items.extend({"image": image, "caption": caption, "image_id": key} for caption in captions)
            else:
                eval_items.append({"image": image, "caption": captions})
                gt_images.append({"id": image_id})
                gt_annotations.extend({"image_id": image_id, "caption": caption, "id": len(gt_annotations) + i}
                                      for i, caption in enumerate(captions))
        name = f"{prefix}_{split}"
        written[name] = _write_json(root / "annotation" / f"{name}.json", train_items or eval_items)
        if style == "coco" and split != "train":
            written[f"{name}_gt"] = _write_json(root / "annotation" / "coco_gt" / f"{name}_gt.json",
                                                {"images": gt_images, "annotations": gt_annotations})
    return written


def write_vg_caption(root: str | Path, num_images: int = 16, captions_per_image: int = 3, image_size: int = 64,
                     seed: int = 0) -> dict[str, Path]:
    """BLIP's Visual Genome caption file: `annotation/vg_caption.json`, items `{"image", "caption"}` (no image id)
    with images `VG_100K/<id>.jpg`, several captions per image."""
    root, rng = Path(root), random.Random(seed)
    items = []
    for image_number in range(1, num_images + 1):
        image = f"VG_100K/{image_number}.jpg"
        scene = random_scene(rng)
        _save_image(root, image, scene, image_size)
        items.extend({"image": image, "caption": caption} for caption in scene_captions(scene, rng, captions_per_image))
    return {"vg_caption": _write_json(root / "annotation" / "vg_caption.json", items)}


def write_nocaps(root: str | Path, num_val: int = 8, num_test: int = 8, image_size: int = 64,
                 seed: int = 0) -> dict[str, Path]:
    """`nocaps_{val,test}.json` items `{"image", "img_id"}` with images `nocaps/<split>/<name>.jpg`."""
    root, rng = Path(root), random.Random(seed)
    written = {}
    for split, count in (("val", num_val), ("test", num_test)):
        items = []
        for img_id in range(count):
            image = f"nocaps/{split}/{rng.getrandbits(64):016x}.jpg"
            _save_image(root, image, random_scene(rng), image_size)
            items.append({"image": image, "img_id": img_id})
        written[f"nocaps_{split}"] = _write_json(root / "annotation" / f"nocaps_{split}.json", items)
    return written


# --------------------------------------------------------------------------------------------------- VQA


def _scene_questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question, true answer, answer_type, question_type) about counts, colours, shapes and presence."""
    questions = [("How many shapes are there?", str(len(scene.shapes)), "number", "how many")]
    kinds = Counter(shape.kind for shape in scene.shapes)
    colours = Counter(shape.colour for shape in scene.shapes)
    unique_kinds = [shape for shape in scene.shapes if kinds[shape.kind] == 1]
    if unique_kinds:
        shape = rng.choice(unique_kinds)
        questions.append((f"What color is the {shape.kind}?", shape.colour, "other", "what color is the"))
    unique_colours = [shape for shape in scene.shapes if colours[shape.colour] == 1]
    if unique_colours:
        shape = rng.choice(unique_colours)
        questions.append((f"What shape is the {shape.colour} object?", shape.kind, "other", "what"))
    colour, kind = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    present = any(shape.colour == colour and shape.kind == kind for shape in scene.shapes)
    questions.append((f"Is there a {colour} {kind}?", "yes" if present else "no", "yes/no", "is there a"))
    return questions


def _human_answers(answer: str, answer_type: str, rng: random.Random, count: int = 10) -> list[str]:
    """`count` annotator answers: mostly the truth, some in another surface form (number words, articles,
    capitals, which the VQA normalisation undoes) and some plainly wrong."""
    if answer_type == "number":
        wrong_pool, variant = [str(n) for n in range(1, 7)], NUMBER_WORDS[int(answer)]
    elif answer_type == "yes/no":
        wrong_pool, variant = ["yes", "no"], answer.capitalize()
    else:
        wrong_pool = list(COLOURS) if answer in COLOURS else list(SHAPES)
        variant = f"the {answer}"
    answers = []
    for _ in range(count):
        draw = rng.random()
        if draw < 0.15:
            answers.append(rng.choice([w for w in wrong_pool if w != answer]))
        elif draw < 0.3:
            answers.append(variant)
        else:
            answers.append(answer)
    return answers


def write_vqa(root: str | Path, num_train_images: int = 8, num_val_images: int = 4, num_test_images: int = 4,
              num_vg_images: int = 4, image_size: int = 64, seed: int = 0) -> dict[str, Path]:
    """VQAv2 as BLIP/LAVIS ship it: `vqa_train.json`, `vqa_val.json` (`{"question_id","question","answer":[10],
    "image","dataset":"vqa"}`), `vg_qa.json` (one `answer`, `"dataset":"vg"`), `vqa_test.json`
    (`{"question_id","question","image"}`), `answer_list.json`, and the official val files
    `v2_OpenEnded_mscoco_val2014_questions.json` + `v2_mscoco_val2014_annotations.json` for the VQA eval tool."""
    root, rng = Path(root), random.Random(seed)
    annotation = root / "annotation"
    written: dict[str, Path] = {}
    answer_counts: Counter[str] = Counter()
    official_questions, official_annotations = [], []
    image_id = 100
    for split, count in (("train", num_train_images), ("val", num_val_images), ("test", num_test_images),
                         ("vg", num_vg_images)):
        items = []
        for _ in range(count):
            image_id += 1
            folder = {"train": "train2014", "val": "val2014", "test": "test2015"}.get(split)
            image = f"VG_100K/{image_id}.jpg" if folder is None else f"{folder}/COCO_{folder}_{image_id:012d}.jpg"
            scene = random_scene(rng)
            _save_image(root, image, scene, image_size)
            for number, (question, answer, answer_type, question_type) in enumerate(_scene_questions(scene, rng)):
                question_id = image_id * 1000 + number
                if split == "test":
                    items.append({"question_id": question_id, "question": question, "image": image})
                elif split == "vg":
                    items.append({"question_id": question_id, "question": question, "answer": answer,
                                  "image": image, "dataset": "vg"})
                else:
                    humans = _human_answers(answer, answer_type, rng)
                    items.append({"question_id": question_id, "question": question, "answer": humans,
                                  "image": image, "dataset": "vqa"})
                    if split == "train":
                        answer_counts.update(humans)
                    else:
                        official_questions.append({"image_id": image_id, "question": question,
                                                   "question_id": question_id})
                        official_annotations.append({
                            "question_id": question_id, "image_id": image_id, "question_type": question_type,
                            "answer_type": answer_type,
                            "multiple_choice_answer": Counter(humans).most_common(1)[0][0],
                            "answers": [{"answer": h, "answer_confidence": "yes", "answer_id": i + 1}
                                        for i, h in enumerate(humans)]})
        name = {"train": "vqa_train", "val": "vqa_val", "test": "vqa_test", "vg": "vg_qa"}[split]
        written[name] = _write_json(annotation / f"{name}.json", items)
    # BLIP's answer list holds the most frequent training answers; ours: every answer seen in training plus
    # every answer a question can have, so rank inference can always pick the truth.
    candidates = set(answer_counts) | set(COLOURS) | set(SHAPES) | {"yes", "no"} | {str(n) for n in range(1, 10)}
    written["answer_list"] = _write_json(annotation / "answer_list.json",
                                         sorted(candidates, key=lambda a: (-answer_counts[a], a)))
    written["val_questions"] = _write_json(annotation / "v2_OpenEnded_mscoco_val2014_questions.json",
                                           {"questions": official_questions})
    written["val_annotations"] = _write_json(annotation / "v2_mscoco_val2014_annotations.json",
                                             {"annotations": official_annotations})
    return written


# ------------------------------------------------------------------------------------------------- NLVR2


def _pair_statement(left: Scene, right: Scene, rng: random.Random) -> tuple[str, bool]:
    """A sentence about the image pair and whether it is true."""
    colour = rng.choice(list(COLOURS))
    left_count = sum(shape.colour == colour for shape in left.shapes)
    right_count = sum(shape.colour == colour for shape in right.shapes)
    form = rng.randrange(3)
    if form == 0:
        return f"The left image contains more {colour} shapes than the right image.", left_count > right_count
    if form == 1:
        total = len(left.shapes) + len(right.shapes)
        claimed = total if rng.random() < 0.5 else total + rng.choice([-1, 1])
        return f"There are exactly {claimed} shapes in the two images.", claimed == total
    kind = rng.choice(SHAPES)
    both = all(any(shape.kind == kind for shape in scene.shapes) for scene in (left, right))
    return f"Each image contains at least one {kind}.", both


def write_nlvr(root: str | Path, num_train: int = 16, num_dev: int = 8, num_test: int = 8, image_size: int = 64,
               seed: int = 0) -> dict[str, Path]:
    """`nlvr_{train,dev,test}.json` items `{"images": [left, right], "sentence", "label": "True"|"False"}` with
    images `<split>/<split>-<set>-<pair>-img{0,1}.png` (the NLVR2 naming)."""
    root, rng = Path(root), random.Random(seed)
    written = {}
    for split, count in (("train", num_train), ("dev", num_dev), ("test", num_test)):
        items = []
        for pair in range(count):
            scenes = (random_scene(rng), random_scene(rng))
            images = [f"{split}/{split}-{pair // 4}-{pair % 4}-img{side}.png" for side in (0, 1)]
            for image, scene in zip(images, scenes):
                _save_image(root, image, scene, image_size)
            sentence, truth = _pair_statement(*scenes, rng)
            items.append({"images": images, "sentence": sentence, "label": "True" if truth else "False"})
        written[f"nlvr_{split}"] = _write_json(root / "annotation" / f"nlvr_{split}.json", items)
    return written


# ------------------------------------------------------------------------------------------------ MSRVTT

_MOTIONS = {"from left to right": ((0.15, 0.5), (0.85, 0.5)), "from right to left": ((0.85, 0.5), (0.15, 0.5)),
            "from top to bottom": ((0.5, 0.15), (0.5, 0.85)), "from bottom to top": ((0.5, 0.85), (0.5, 0.15))}


def write_msrvtt(root: str | Path, num_videos: int = 8, num_frames: int = 16, frame_size: int = 64, fps: int = 8,
                 seed: int = 0) -> dict[str, Path]:
    """`msrvtt_test.jsonl` lines `{"clip_name", "caption"}` and clips `videos/<clip_name>.mp4` (one moving
    shape per clip, written with OpenCV's mp4v codec since PyAV is not installed)."""
    import cv2
    import numpy as np

    root, rng = Path(root), random.Random(seed)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for number in range(num_videos):
        clip_name = f"video{7000 + number}"
        background = rng.choice(list(BACKGROUNDS))
        kind, colour = rng.choice(SHAPES), rng.choice([c for c in COLOURS if c != background])
        motion, (start, end) = rng.choice(list(_MOTIONS.items()))
        writer = cv2.VideoWriter(str(root / "videos" / f"{clip_name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                 (frame_size, frame_size))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot write mp4v video here")
        for step in range(num_frames):
            t = step / max(num_frames - 1, 1)
            centre = (start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1]))
            frame = render_scene(Scene((Shape(kind, colour, centre, 0.12),), background), frame_size)
            writer.write(cv2.cvtColor(np.asarray(frame), cv2.COLOR_RGB2BGR))
        writer.release()
        lines.append({"clip_name": clip_name, "caption": f"a {colour} {kind} moves {motion} on a {background} "
                                                         "background"})
    path = root / "annotation" / "msrvtt_test.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"msrvtt_test": path}
