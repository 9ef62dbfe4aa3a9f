"""Text cleaning and image transforms used by BLIP (Li et al. 2022), following salesforce/BLIP `data/utils.py`,
`data/__init__.py` and `transform/randaugment.py` (paraphrased, see shared/docs/blip_spec.md §1.4 and §2.3).

`RandomAugment` is re-implemented with PIL operations instead of OpenCV; at the BLIP setting (N=2, M=5) the
geometric magnitudes match the reference (rotate ±15°, shear ±0.15, translate ±5 px, fill 128) and
Brightness/Sharpness have factor 1.0 (identity), exactly as in the reference.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

# CLIP statistics, used by every BLIP transform.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_PUNCTUATION = re.compile(r"[.!\"()*#:;~]")
_MULTI_SPACE = re.compile(r"\s{2,}")


def pre_caption(text: str, max_words: int = 50) -> str:
    """Lowercase, turn `. ! " ( ) * # : ; ~` into spaces, collapse whitespace runs, truncate to `max_words` words."""
    caption = _PUNCTUATION.sub(" ", text.lower())
    caption = _MULTI_SPACE.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(text: str, max_words: int = 50) -> str:
    """Lowercase, delete (not space-replace) the same punctuation, strip trailing spaces, truncate to `max_words`."""
    question = _PUNCTUATION.sub("", text.lower())
    question = question.rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


# ------------------------------------------------------------------------------------------- RandomAugment

_MAX_LEVEL = 10.0
_FILL = (128, 128, 128)


def _identity(img: Any, level: float, rng: random.Random) -> Any:
    return img


def _autocontrast(img: Any, level: float, rng: random.Random) -> Any:
    from PIL import ImageOps

    return ImageOps.autocontrast(img)


def _equalize(img: Any, level: float, rng: random.Random) -> Any:
    from PIL import ImageOps

    return ImageOps.equalize(img)


def _enhance_factor(level: float) -> float:
    # Reference: (level / MAX_LEVEL) * 1.8 + 0.1, which is exactly 1.0 at level 5.
    return (level / _MAX_LEVEL) * 1.8 + 0.1


def _brightness(img: Any, level: float, rng: random.Random) -> Any:
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(img).enhance(_enhance_factor(level))


def _sharpness(img: Any, level: float, rng: random.Random) -> Any:
    from PIL import ImageEnhance

    return ImageEnhance.Sharpness(img).enhance(_enhance_factor(level))


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(img: Any, coefficients: tuple[float, ...]) -> Any:
    from PIL import Image

    fill = _FILL if img.mode == "RGB" else 128
    return img.transform(
        img.size, Image.Transform.AFFINE, coefficients, resample=Image.Resampling.NEAREST, fillcolor=fill
    )


def _shear_x(img: Any, level: float, rng: random.Random) -> Any:
    shear = _signed(level / _MAX_LEVEL * 0.3, rng)  # ±0.15 at M=5
    return _affine(img, (1.0, shear, 0.0, 0.0, 1.0, 0.0))


def _shear_y(img: Any, level: float, rng: random.Random) -> Any:
    shear = _signed(level / _MAX_LEVEL * 0.3, rng)
    return _affine(img, (1.0, 0.0, 0.0, shear, 1.0, 0.0))


def _translate_x(img: Any, level: float, rng: random.Random) -> Any:
    offset = _signed(level / _MAX_LEVEL * 10.0, rng)  # translate_const 10 → ±5 px at M=5
    return _affine(img, (1.0, 0.0, -offset, 0.0, 1.0, 0.0))


def _translate_y(img: Any, level: float, rng: random.Random) -> Any:
    offset = _signed(level / _MAX_LEVEL * 10.0, rng)
    return _affine(img, (1.0, 0.0, 0.0, 0.0, 1.0, -offset))


def _rotate(img: Any, level: float, rng: random.Random) -> Any:
    from PIL import Image

    angle = _signed(level / _MAX_LEVEL * 30.0, rng)  # ±15° at M=5
    fill = _FILL if img.mode == "RGB" else 128
    return img.rotate(angle, resample=Image.Resampling.NEAREST, fillcolor=fill)


AUGMENT_OPS: dict[str, Callable[[Any, float, random.Random], Any]] = {
    "Identity": _identity,
    "AutoContrast": _autocontrast,
    "Equalize": _equalize,
    "Brightness": _brightness,
    "Sharpness": _sharpness,
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateX": _translate_x,
    "TranslateY": _translate_y,
    "Rotate": _rotate,
}

BLIP_AUGMENT_OPS = (
    "Identity", "AutoContrast", "Brightness", "Sharpness", "Equalize",
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
)  # fmt: skip


class RandomAugment:
    """Pick `n` ops with replacement; apply each with probability `prob` at magnitude `m` (PIL in, PIL out).

    `seed` makes the sequence of decisions reproducible (one private `random.Random` per instance).
    """

    def __init__(self, n: int = 2, m: float = 5, ops: Sequence[str] = BLIP_AUGMENT_OPS, prob: float = 0.5,
                 seed: int | None = None) -> None:  # fmt: skip
        unknown = [op for op in ops if op not in AUGMENT_OPS]
        if unknown:
            raise ValueError(f"RandomAugment: unknown ops {unknown}; valid: {sorted(AUGMENT_OPS)}")
        if not 0 <= m <= _MAX_LEVEL:
            raise ValueError(f"RandomAugment: magnitude m={m} must be in [0, {_MAX_LEVEL}]")
        self.n, self.m, self.ops, self.prob = n, float(m), tuple(ops), prob
        self.rng = random.Random(seed)

    def __call__(self, img: Any) -> Any:
        chosen = [self.rng.choice(self.ops) for _ in range(self.n)]  # with replacement, as the reference
        for name in chosen:
            if self.rng.random() < self.prob:
                img = AUGMENT_OPS[name](img, self.m, self.rng)
        return img

    def __repr__(self) -> str:
        return f"RandomAugment(n={self.n}, m={self.m}, ops={list(self.ops)}, prob={self.prob})"


def train_transform(image_size: int, min_scale: float = 0.5, augment_seed: int | None = None) -> Callable[[Any], Any]:
    """BLIP training transform: RandomResizedCrop(bicubic) → flip → RandomAugment(2, 5) → tensor → normalize.

    `min_scale` is 0.2 for pretraining and 0.5 for finetuning (spec §2.3). The crop and flip use torch's global RNG
    (seed it with torch.manual_seed); RandomAugment uses its own `augment_seed`.
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    if not 0 < min_scale <= 1:
        raise ValueError(f"train_transform: min_scale={min_scale} must be in (0, 1]")
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(),
        RandomAugment(2, 5, BLIP_AUGMENT_OPS, seed=augment_seed),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])  # fmt: skip


def eval_transform(image_size: int) -> Callable[[Any], Any]:
    """BLIP evaluation transform: square Resize((s, s)) bicubic (aspect not kept) → tensor → CLIP normalize."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    return transforms.Compose([
        transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(CLIP_MEAN, CLIP_STD),
    ])  # fmt: skip
