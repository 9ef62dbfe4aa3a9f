"""The pipeline preset: one typed config for the whole bootstrap recipe (configs/pipeline/<preset>.yaml).

Each section is the config of one stage, so a preset is validated completely — every key, type and range —
before any stage starts (`load_pipeline`). Version names derive from `name`: `<name>-raw`, `<name>-web`, ...
No Prefect or Ray imports here: `blip submit` and the tests validate presets without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pipelines.config import CONFIG_DIR, ConfigError, load_config
from pipelines.tasks.capfilt import CapFiltConfig
from pipelines.tasks.demo_corpus import DemoCorpusConfig
from pipelines.tasks.download import DownloadConfig
from pipelines.tasks.downstream import DownstreamConfig
from pipelines.tasks.evaluate import EvaluateConfig
from pipelines.tasks.finetune import FinetuneConfig
from pipelines.tasks.pretrain import PretrainConfig
from pipelines.tasks.shard import ShardConfig

PRESETS = ("tiny", "14m", "129m")


@dataclass(frozen=True, kw_only=True)
class SourceConfig:
    """Where the noisy web pairs come from."""

    kind: Literal["demo", "list"] = "demo"  # demo: the embedded synthetic corpus, served on 127.0.0.1
    demo: DemoCorpusConfig = field(default_factory=DemoCorpusConfig)
    path: str | None = None  # kind=list: a source list (BLIP JSON, img2dataset csv/tsv/parquet), local or URL

    def __post_init__(self) -> None:
        if self.kind == "list" and not self.path:
            raise ValueError("'source.path' is required when source.kind is 'list'")


@dataclass(frozen=True, kw_only=True)
class CapFiltModelsConfig:
    """CapFilt with a captioner and a filter you already have — BLIP's released ones
    (`model_base_caption_capfilt_large`, `model_base_retrieval_coco`) — instead of the pair the recipe pretrains on
    the web pairs and finetunes: any checkpoint `blip data publish-model` takes (a path, URL or checkpoint name, a
    transformers or save_pretrained directory), published as model versions, or model versions of the registry.
    Both or neither."""

    captioner: str | None = None
    filter: str | None = None

    def __post_init__(self) -> None:
        if (self.captioner is None) != (self.filter is None):
            raise ValueError("'capfilt_models' needs both 'captioner' and 'filter', or neither")

    @property
    def given(self) -> bool:
        return self.captioner is not None


@dataclass(frozen=True, kw_only=True)
class PipelineConfig:
    """BLIP's recipe: download -> shard -> pretrain -> finetune captioner/filter -> CapFilt -> pretrain ->
    finetune + evaluate -> report (raw-web model vs bootstrapped model)."""

    name: str  # prefix of every version this pipeline publishes
    registry: str | None = None  # registry URL; None: BLIP_REGISTRY or ./artifacts/registry
    ray_address: str | None = None  # None: RAY_ADDRESS or a private local Ray; auto: `ray start`'s
    source: SourceConfig = field(default_factory=SourceConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)
    finetune_captioner: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(task="caption"))
    finetune_filter: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(task="retrieval"))
    capfilt: CapFiltConfig = field(default_factory=CapFiltConfig)
    capfilt_models: CapFiltModelsConfig = field(default_factory=CapFiltModelsConfig)  # none: web pretrain + finetune
    evaluate_caption: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(task="caption"))
    evaluate_retrieval: EvaluateConfig = field(default_factory=lambda: EvaluateConfig(task="retrieval"))
    # BLIP pretrains both models on the web pairs + human-annotated pairs (COCO, VG; spec §3): the downstream
    # set's train split joins both pretrainings, and so does every set listed in `human_pairs` (published by the
    # flow like the downstream set, e.g. `{kind: files, benchmark: vg_caption, ...}` for Visual Genome captions).
    pretrain_with_downstream: bool = True
    human_pairs: list[DownstreamConfig] = field(default_factory=list)
    # Keep the downstream set's val/test images out of the web training data: the shard stage drops near copies
    # of them (`eval_overlap`, by difference hash; `shard.eval_overlap_max_distance`), as DataComp keeps its pool
    # apart from its evaluation sets. BLIP did not; web copies of COCO / Flickr test images inflate zero-shot scores.
    decontaminate: bool = False

    def __post_init__(self) -> None:
        for index, pairs in enumerate(self.human_pairs):
            if pairs.benchmark not in ("coco", "flickr", "vg_caption"):
                raise ValueError(f"'human_pairs[{index}].benchmark': {pairs.benchmark!r} has no caption pairs "
                                 "(expected coco, flickr or vg_caption)")  # fmt: skip
        if self.finetune_captioner.task != "caption":
            raise ValueError("'finetune_captioner.task' must be 'caption'")
        if self.finetune_filter.task != "retrieval":
            raise ValueError("'finetune_filter.task' must be 'retrieval'")

    def version_name(self, what: str) -> str:
        return f"{self.name}-{what}"


def preset_path(preset_or_path: str | Path) -> Path:
    """A preset name (tiny, 14m, 129m) or a path to a pipeline YAML."""
    text = str(preset_or_path)
    if text in PRESETS or (not text.endswith((".yaml", ".yml")) and (CONFIG_DIR / "pipeline" / f"{text}.yaml").exists()):
        return CONFIG_DIR / "pipeline" / f"{text}.yaml"
    path = Path(text)
    if not path.exists():
        raise ConfigError(f"{text}: neither a preset ({', '.join(PRESETS)}) nor an existing config file")
    return path


def load_pipeline(preset_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    return load_config(PipelineConfig, preset_path(preset_or_path), overrides)
