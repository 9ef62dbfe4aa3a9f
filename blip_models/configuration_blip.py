"""Typed, frozen model-architecture configs for BLIP (ViT + MED text transformer), spec §1.2, §1.3, §1.6.

Presets: `tiny` (unit tests, seconds on CPU), `small` (the CPU demo: learns the demo corpus in minutes), `base`
(ViT-B/16 + BERT-base), `large` (ViT-L/16 + BERT-base with encoder_width 1024 and the reference's always-0.1
drop-path quirk). The same shapes live in configs/model/*.yaml and
load with `pipelines.config.load_config(BlipConfig, path)`; `from_dict` here does the same checking without pipelines/.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


def _check(owner: str, name: str, ok: bool, value: Any, expectation: str) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name} = {value!r}: {expectation}")


@dataclass(frozen=True, kw_only=True)
class VisionConfig:
    """ViT image encoder (timm-0.4.12-style, pre-norm)."""

    image_size: int = 224  # input resolution; pos-embed is interpolated when a checkpoint differs
    patch_size: int = 16
    width: int = 768  # hidden size (768 ViT-B, 1024 ViT-L)
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0  # stochastic depth (0.1 for VQA/NLVR2 and always for ViT-L)
    grad_ckpt_layers: int = 0  # gradient-checkpoint the last k blocks (0 = off)
    layer_norm_eps: float = 1e-6
    # Weight init std (timm's 0.02, made for width 768). Narrow from-scratch models need ~1/sqrt(width): at 0.02
    # their attention branches are so small that every image's [CLS] feature is the same vector at step 0.
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        name = "VisionConfig"
        _check(name, "image_size", self.image_size > 0 and self.image_size % self.patch_size == 0, self.image_size,
               f"must be a positive multiple of patch_size={self.patch_size}")  # fmt: skip
        _check(name, "width", self.width > 0 and self.width % self.heads == 0, self.width,
               f"must be a positive multiple of heads={self.heads}")  # fmt: skip
        _check(name, "depth", self.depth > 0, self.depth, "must be positive")
        _check(name, "drop_path_rate", 0.0 <= self.drop_path_rate < 1.0, self.drop_path_rate, "must be in [0, 1)")
        _check(name, "grad_ckpt_layers", 0 <= self.grad_ckpt_layers <= self.depth, self.grad_ckpt_layers,
               f"must be in [0, depth={self.depth}]")  # fmt: skip

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """MED text transformer (BERT-base shaped, post-LN, cross-attention in every layer)."""

    vocab_size: int = 30524  # 30522 BERT + [DEC] + [ENC]
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    encoder_width: int = 768  # key/value input width of cross-attention (the ViT width)
    label_smoothing: float = 0.1  # LM loss label smoothing, hard-coded 0.1 in the reference
    pad_token_id: int = 0
    bos_token_id: int = 30522  # [DEC]: first token of every decoder input
    enc_token_id: int = 30523  # [ENC]: first token of image-grounded encoder inputs
    sep_token_id: int = 102  # [SEP]: end of sequence for generation
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        name = "TextConfig"
        heads = self.num_attention_heads
        _check(name, "hidden_size", self.hidden_size > 0 and self.hidden_size % heads == 0, self.hidden_size,
               f"must be a positive multiple of num_attention_heads={heads}")  # fmt: skip
        _check(name, "vocab_size", self.vocab_size > 0, self.vocab_size, "must be positive")
        _check(name, "num_hidden_layers", self.num_hidden_layers > 0, self.num_hidden_layers, "must be positive")
        for key in ("hidden_dropout", "attention_dropout", "label_smoothing"):
            value = getattr(self, key)
            _check(name, key, 0.0 <= value < 1.0, value, "must be in [0, 1)")


@dataclass(frozen=True, kw_only=True)
class BlipConfig:
    """Whole BLIP model: vision + text + contrastive/momentum settings (spec §1.6, §2.2)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # ITC projection size
    queue_size: int = 57600  # ITC feature queue length (must be divisible by the global batch)
    momentum: float = 0.995  # momentum-encoder EMA
    alpha: float = 0.4  # momentum-distillation weight (ramped by the trainer)
    temp: float = 0.07  # initial learnable temperature, clamped to [0.001, 0.5]
    prompt: str = "a picture of "  # captioning prompt

    def __post_init__(self) -> None:
        name = "BlipConfig"
        _check(name, "embed_dim", self.embed_dim > 0, self.embed_dim, "must be positive")
        _check(name, "queue_size", self.queue_size > 0, self.queue_size, "must be positive")
        _check(name, "momentum", 0.0 <= self.momentum <= 1.0, self.momentum, "must be in [0, 1]")
        _check(name, "alpha", 0.0 <= self.alpha <= 1.0, self.alpha, "must be in [0, 1]")
        _check(name, "temp", 0.001 <= self.temp <= 0.5, self.temp, "must be in [0.001, 0.5]")
        _check(name, "text.vocab_size", self.text.vocab_size > max(self.text.bos_token_id, self.text.enc_token_id),
               self.text.vocab_size, "must hold the [DEC] and [ENC] ids")  # fmt: skip

    def replace(self, **changes: Any) -> BlipConfig:
        """Copy with top-level changes; `vision={...}` / `text={...}` dicts update the nested configs."""
        for key in ("vision", "text"):
            if isinstance(changes.get(key), dict):
                changes[key] = dataclasses.replace(getattr(self, key), **changes[key])
        return dataclasses.replace(self, **changes)


def _tiny() -> BlipConfig:
    return BlipConfig(
        vision=VisionConfig(image_size=32, patch_size=8, width=32, depth=2, heads=2),
        text=TextConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, encoder_width=32, hidden_dropout=0.0, attention_dropout=0.0),
        embed_dim=16,
        queue_size=32,
    )  # fmt: skip


def _small() -> BlipConfig:
    # The demo's CPU model: big enough to learn the demo corpus's image-text alignment from scratch in a few
    # hundred steps on 2 cores (ITC, ITM and LM all fall), small enough for the 15-minute demo. Narrow widths
    # need a larger init than BERT/timm's 0.02 (see VisionConfig.initializer_range); no momentum distillation:
    # a from-scratch momentum teacher only blurs the targets during a run this short.
    return BlipConfig(
        vision=VisionConfig(image_size=64, patch_size=8, width=64, depth=4, heads=4, initializer_range=0.08),
        text=TextConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64, encoder_width=64, hidden_dropout=0.0, attention_dropout=0.0,
                        initializer_range=0.1),
        embed_dim=64,
        queue_size=64,
        alpha=0.0,
    )  # fmt: skip


def _base() -> BlipConfig:
    return BlipConfig(vision=VisionConfig(), text=TextConfig())


def _large() -> BlipConfig:
    # Reference quirk: `0.1 or drop_path_rate` makes ViT-L drop-path always 0.1.
    return BlipConfig(
        vision=VisionConfig(width=1024, depth=24, heads=16, drop_path_rate=0.1),
        text=TextConfig(encoder_width=1024),
    )


PRESETS = {"tiny": _tiny, "small": _small, "base": _base, "large": _large}


def preset(name: str) -> BlipConfig:
    """One of the named presets: 'tiny', 'base', 'large'."""
    if name not in PRESETS:
        raise ValueError(f"unknown BLIP preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (JSON/YAML-able)."""
    return dataclasses.asdict(config)


def from_dict(raw: dict[str, Any], cls: type = BlipConfig, prefix: str = "") -> Any:
    """Build a config from a nested dict, rejecting unknown keys with a message naming the dotted key."""
    if not isinstance(raw, dict):
        raise ValueError(f"{prefix or cls.__name__}: expected a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        dotted = ", ".join(f"{prefix}{key}" for key in unknown)
        raise ValueError(f"unknown {cls.__name__} key(s): {dotted} (valid: {', '.join(sorted(fields))})")
    values: dict[str, Any] = {}
    nested = {"vision": VisionConfig, "text": TextConfig}
    for key, value in raw.items():
        if cls is BlipConfig and key in nested:
            values[key] = from_dict(value, nested[key], prefix=f"{prefix}{key}.")
        else:
            values[key] = value
    return cls(**values)
