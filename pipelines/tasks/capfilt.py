"""CapFilt: bootstrap a web dataset version with a captioner and a filter (BLIP, Li et al. 2022, §3.3).

The captioner (image-grounded decoder) writes N synthetic captions per web image with nucleus sampling; the
filter (image-grounded encoder, ITM head) scores the web text and every synthetic caption; a text is kept when its
ITM match probability is >= the threshold (0.5 = the argmax rule the BLIP maintainers describe, spec §3). The new
dataset version is the union of kept web and kept synthetic texts (the BLIP recipe), with every decision recorded.

Layout of this stage (shared/docs/style.md §11): config dataclasses and pure functions here (`sample_seed`,
`keep_mask`, `decide_texts`, `shard_stats`, `merge_stats`, deterministic tar I/O) and the driver `run_capfilt`;
the tensor side (captioning, ITM scoring) in `capfilt_models.py`; the Ray Data adapter in `_ray_capfilt.py` (the
only module importing `ray.data`); measurements against a corpus's ground truth in `capfilt_quality.py`.

How several kept texts reach pretraining: ONE training sample per image. `{key}.json` lists every text with its
source, score and decision (`texts`) plus the kept ones (`captions`); `{key}.txt` is the kept text with the highest
ITM score, so a reader that only knows `.txt` still trains on a filtered pair, and a reader that samples from
`captions` (pretraining does: `pretrain.kept_text`) gets BLIP's union of filtered web + filtered synthetic pairs
without storing an image twice.
An image none of whose texts is kept is left out of the shards but stays in index.parquet/texts.parquet with
its reason. texts.parquet lists each sample's texts together, in the index's order, and the index says where
(`texts_row`, `texts_count`): the browser reads a page's texts by position, not by a scan for their keys.

Resumability (datatrove `completions/` pattern): each input shard is one unit of work. Its outputs (tar, index
and texts parts) are written to `registry.shared_work_url(cache_key)` and a `done/<shard>.json` marker is put in
place last. A relaunch skips the marked shards. Model batches are fixed consecutive slices of an input shard and
every synthetic caption draws from its own generator seeded with `sample_seed(seed, key, i)`, so a shard's output
bytes do not depend on which other shards ran in the same job (byte-identical resume).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any, Literal

from pipelines import runtime
from pipelines.config import RangeError, check_range
from pipelines.progress import StageProgress
from pipelines.tasks.shard_cache import ShardCache, is_local
from pipelines.tasks.webdata import atomic_output, count_tar_samples, iter_tar_samples, write_tar

if TYPE_CHECKING:
    from pathlib import Path

    from datasets_manifests.manifest import Manifest
    from datasets_manifests.registry import Registry

log = logging.getLogger(__name__)

STAGE = "capfilt"
SOURCES = ("web", "synthetic")
BEAM_REPETITION_PENALTY = 1.0  # BLIP's beam search: no repetition penalty (the config's 1.1 is for sampling)
# Set to 1 when the local registry lives on a filesystem mounted at the same path on every Ray node (NFS, ...).
SHARED_FILESYSTEM_ENV = runtime.SHARED_FILESYSTEM_ENV
HISTOGRAM_BINS = 20  # ITM-score histogram: 20 bins of width 0.05 over [0, 1]
MAX_REJECT_EXAMPLES = 25


# ------------------------------------------------------------------------------------------------ config


@dataclass(frozen=True, kw_only=True, slots=True)
class CaptionerConfig:
    """Synthetic caption generation (BLIP `BLIP_Decoder.generate`, spec §3 and §4.2)."""

    method: Literal["nucleus", "beam"] = "nucleus"  # BLIP CapFilt uses nucleus sampling; beam for comparison
    num_captions: int = 1  # synthetic captions per image (the paper: 1)
    prompt: str = "a picture of "  # prefix fed to the decoder and cut from the output
    top_p: float = 0.9  # nucleus mass
    # BLIP sampled through transformers 4.15 `generate`, which filled top_k from the config default 50 (BLIP's
    # med_config sets none): the nucleus is taken among the 50 best tokens. 0 = the whole vocabulary.
    top_k: int = 50
    repetition_penalty: float = 1.1  # nucleus only: BLIP hard-codes 1.1 when sampling (beam search always uses 1.0)
    num_beams: int = 3  # beam search only; num_captions of the beams are kept, so num_captions <= num_beams
    min_length: int = 10  # in tokens, INCLUDING the prompt tokens (BLIP's convention)
    max_length: int = 30  # in tokens, including the prompt
    seed: int = 0  # base seed; caption i of sample `key` uses sample_seed(seed, key, i)
    max_words: int = 30  # pre_caption(max_words) applied to synthetic captions, as to web captions

    def __post_init__(self) -> None:
        check_range("captioner", "num_captions", self.num_captions, 0, 64)
        check_range("captioner", "top_p", self.top_p, 0.0, 1.0)
        check_range("captioner", "top_k", self.top_k, 0)
        check_range("captioner", "repetition_penalty", self.repetition_penalty, 1.0)
        check_range("captioner", "num_beams", self.num_beams, 1, 64)
        check_range("captioner", "min_length", self.min_length, 0)
        check_range("captioner", "max_length", self.max_length, max(self.min_length, 1))
        check_range("captioner", "max_words", self.max_words, 1)
        if self.top_p <= 0.0:
            raise ValueError("'top_p' must be > 0")
        if self.method == "beam" and self.num_captions > self.num_beams:
            # Otherwise it fails only inside the actors, after Ray has started and the models have loaded.
            raise RangeError(f"'num_captions' = {self.num_captions} is more than 'num_beams' = {self.num_beams}: "
                             "beam search returns at most num_beams captions per image", "num_captions")  # fmt: skip

    def caption_seeds(self, key: str) -> list[int | None]:
        """The seed of each synthetic caption of sample `key` (None with beam search, which draws nothing)."""
        if self.method != "nucleus":
            return [None] * self.num_captions
        return [sample_seed(self.seed, key, index) for index in range(self.num_captions)]


@dataclass(frozen=True, kw_only=True, slots=True)
class FilterConfig:
    """ITM filtering (spec §3: keep a text when the ITM head says 'matched', i.e. probability >= 0.5)."""

    threshold: float = 0.5  # default match-probability threshold for every source
    thresholds: dict[str, float] = field(default_factory=dict)  # per-source overrides: {web: 0.6, synthetic: 0.4}
    max_text_tokens: int = 35  # ITM text truncation (BLIP retrieval uses 35)

    def __post_init__(self) -> None:
        check_range("filter", "threshold", self.threshold, 0.0, 1.0)
        for source, value in self.thresholds.items():
            if source not in SOURCES:
                raise ValueError(f"'thresholds.{source}': unknown source (expected one of {', '.join(SOURCES)})")
            check_range("filter", f"thresholds.{source}", value, 0.0, 1.0)
        check_range("filter", "max_text_tokens", self.max_text_tokens, 4)

    def threshold_for(self, source: str) -> float:
        return self.thresholds.get(source, self.threshold)


@dataclass(frozen=True, kw_only=True, slots=True)
class ComputeConfig:
    """How the stage maps onto Ray: CPU decode tasks feeding model actor pools."""

    colocate: bool = True  # one actor holds captioner + filter (image decoded and normalised once)
    batch_size: int = 16  # images per model batch: a fixed slice of an input shard
    num_actors: int = 1  # colocated pool size, or the captioner pool size when colocate=false
    filter_actors: int = 1  # filter pool size when colocate=false
    num_gpus_per_actor: float = 0.0  # > 0 on GPU clusters (0.5 = two actors share a GPU, overlapping I/O)
    num_cpus_per_actor: float = 0.5  # fractional on small machines, or the pool starves the decode tasks
    decode_cpus: float = 0.5  # CPUs per decode task (JPEG decode + resize)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto = cuda when num_gpus_per_actor > 0, else cpu
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # model dtype on the device (bf16 on GPUs)
    torch_threads: int = 1  # intra-op threads per actor on CPU
    compile_vision: bool = False  # torch.compile the ViT blocks (regional): GPU actors; a little compile time each
    # Both ViTs' linear layers in FP8 (blip_models.float8; FP8 GPUs: L4/L40/H100/H200). Changes ITM scores a
    # little: measure the keep-decision agreement with benchmarks/bench_fp8_vision.py on your models first.
    fp8_vision: bool = False
    # CPUs per writer task: a finished shard's outputs (tar, index parts) are written by a Ray task, not the driver
    writer_cpus: float = 0.5
    # A directory on each node's local disk for remote input shards (s3://, gs://, http://): the decode task
    # downloads a shard into it once and the shard's writer task, placed on the same node, reads that copy instead
    # of downloading the shard again. null: no cache (each shard is read twice from the store).
    shard_cache_dir: str | None = None
    shard_cache_gb: float = 100.0  # the least recently read shards are removed beyond this size
    progress_bars: bool = False  # Ray Data's own bar per operator too (the stage's, images and shards, always shows)

    def __post_init__(self) -> None:
        check_range("compute", "batch_size", self.batch_size, 1)
        check_range("compute", "num_actors", self.num_actors, 1)
        check_range("compute", "filter_actors", self.filter_actors, 1)
        check_range("compute", "num_gpus_per_actor", self.num_gpus_per_actor, 0.0)
        check_range("compute", "num_cpus_per_actor", self.num_cpus_per_actor, 0.0)
        check_range("compute", "decode_cpus", self.decode_cpus, 0.0)
        check_range("compute", "torch_threads", self.torch_threads, 1)
        check_range("compute", "writer_cpus", self.writer_cpus, 0.0)
        check_range("compute", "shard_cache_gb", self.shard_cache_gb, 0.001)

    def resolved_device(self) -> str:
        """The device the actors compute on: 'auto' is cuda exactly when each actor is given a GPU."""
        if self.device != "auto":
            return self.device
        return "cuda" if self.num_gpus_per_actor > 0 else "cpu"


@dataclass(frozen=True, kw_only=True, slots=True)
class CapFiltConfig:
    """The CapFilt stage: captioner + filter over a web dataset version -> bootstrapped dataset version."""

    captioner: CaptionerConfig = field(default_factory=CaptionerConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)
    image_size: int = 0  # 0 = the captioner's own image size (384 for BLIP-base captioning)
    ground_truth: str | None = None  # ground_truth.parquet of a synthetic corpus; None = look along the lineage
    max_shards: int = 0  # 0 = all input shards; >0 processes only the first N (smoke runs)

    def __post_init__(self) -> None:
        check_range("capfilt", "image_size", self.image_size, 0)
        check_range("capfilt", "max_shards", self.max_shards, 0)

    def cache_relevant(self) -> CapFiltConfig:
        """The part of the config that changes the output (compute layout does not: see module docstring).

        Batch composition, device, dtype, FP8 linears and compiled kernels all change floating-point results
        (FP8 flips ~1 % of keep decisions); the device is the resolved one, as 'auto' depends on the GPUs.
        """
        compute = self.compute
        relevant = ComputeConfig(batch_size=compute.batch_size, dtype=compute.dtype, device=compute.resolved_device(),
                                 fp8_vision=compute.fp8_vision, compile_vision=compute.compile_vision)  # fmt: skip
        return replace(self, compute=relevant)


# ------------------------------------------------------------------------------------------ pure functions


def sample_seed(base_seed: int, key: str, index: int) -> int:
    """Seed of synthetic caption `index` of sample `key`: a 63-bit hash of (base seed, key, index).

    Independent of batch, actor and order, so any caption can be regenerated from its texts.parquet row.
    """
    digest = hashlib.sha256(f"{base_seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def keep_mask(scores: list[float], sources: list[str], config: FilterConfig) -> list[bool]:
    """True where a text's ITM match probability reaches its source's threshold."""
    if len(scores) != len(sources):
        raise ValueError(f"keep_mask: {len(scores)} scores for {len(sources)} sources")
    return [score >= config.threshold_for(source) for score, source in zip(scores, sources)]


def round_score(score: float) -> float:
    # Six decimals: readable, and a stable JSON/parquet representation of the score.
    return round(float(score), 6)


def decide_texts(
    key: str,
    web_text: str | None,
    synthetic: list[str],
    scores: list[float] | None,
    seeds: list[int],
    config: CapFiltConfig,
    *,
    captioner: str,
    filter_ref: str,
    image_error: str | None = None,
) -> list[dict[str, Any]]:
    """Text records of one sample (web first, then synthetic i = 0..N-1), each with its decision and reason.

    `scores` holds one ITM probability per text in that order (None when the image could not be decoded).
    """
    texts: list[tuple[str, str, int | None, int | None]] = []  # (text, source, seed, sample_index)
    texts.append((web_text or "", "web", None, None))
    for index, caption in enumerate(synthetic):
        texts.append((caption, "synthetic", seeds[index], index))
    if scores is not None and len(scores) != len(texts):
        raise ValueError(f"decide_texts({key}): {len(scores)} scores for {len(texts)} texts")
    # Decided on the scores as stored (six decimals): a text stored with score 0.5 and threshold 0.5 is kept.
    kept = keep_mask([round_score(score) for score in scores], [t[1] for t in texts], config.filter) \
        if scores is not None else [False] * len(texts)  # fmt: skip
    records = []
    for position, (text, source, seed, index) in enumerate(texts):
        score = round_score(scores[position]) if scores is not None else None
        if image_error:
            reason = image_error
        elif not text.strip():
            reason = "missing_web_text" if source == "web" else "empty_caption"
        elif not kept[position]:
            reason = "itm_below_threshold"
        else:
            reason = None
        records.append({
            "key": key, "text": text, "source": source, "itm_score": score, "kept": reason is None,
            "drop_reason": reason, "captioner": captioner if source == "synthetic" else None,
            "filter": filter_ref, "seed": seed, "sample_index": index,
        })  # fmt: skip
    return records


def choose_caption(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The kept text with the highest ITM score (web wins ties: it comes first); None if nothing is kept."""
    best = None
    for record in records:
        if record["kept"] and (best is None or record["itm_score"] > best["itm_score"]):
            best = record
    return best


def histogram(values: list[float], bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of `values` in `bins` equal bins over [0, 1] (1.0 falls in the last bin)."""
    counts = [0] * bins
    for value in values:
        counts[min(int(value * bins), bins - 1) if value > 0 else 0] += 1
    return counts


def shard_stats(records: list[dict[str, Any]], samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stats of one shard: texts and kept texts per source, score histograms, reasons, a few rejects."""
    stats: dict[str, Any] = {
        "samples": len(samples),
        "samples_kept": sum(1 for s in samples if s["status"] == "ok"),
        "sample_drop_reasons": {},
        "texts": {s: 0 for s in SOURCES},
        "texts_kept": {s: 0 for s in SOURCES},
        "text_drop_reasons": {},
        "histograms": {s: [0] * HISTOGRAM_BINS for s in SOURCES},
        "rejects": [],
    }
    for sample in samples:
        if sample["drop_reason"]:
            reasons = stats["sample_drop_reasons"]
            reasons[sample["drop_reason"]] = reasons.get(sample["drop_reason"], 0) + 1
    scored: dict[str, list[float]] = {s: [] for s in SOURCES}
    for record in records:
        source = record["source"]
        stats["texts"][source] += 1
        stats["texts_kept"][source] += int(record["kept"])
        if record["itm_score"] is not None:
            scored[source].append(record["itm_score"])
        if record["drop_reason"]:
            reasons = stats["text_drop_reasons"]
            reasons[record["drop_reason"]] = reasons.get(record["drop_reason"], 0) + 1
            stats["rejects"].append({k: record[k] for k in ("key", "source", "text", "itm_score", "drop_reason")})
    for source in SOURCES:
        stats["histograms"][source] = histogram(scored[source])
    stats["rejects"] = sorted(stats["rejects"], key=_reject_order)[:MAX_REJECT_EXAMPLES]
    return stats


def merge_stats(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum per-shard stats; add kept fractions per source; keep a deterministic sample of rejects."""
    total = shard_stats([], [])
    for part in parts:
        total["samples"] += part["samples"]
        total["samples_kept"] += part["samples_kept"]
        for name in ("sample_drop_reasons", "text_drop_reasons"):
            for reason, count in part[name].items():
                total[name][reason] = total[name].get(reason, 0) + count
        for source in SOURCES:
            total["texts"][source] += part["texts"][source]
            total["texts_kept"][source] += part["texts_kept"][source]
            total["histograms"][source] = [a + b for a, b in zip(total["histograms"][source], part["histograms"][source])]
        total["rejects"].extend(part["rejects"])
    total["rejects"] = sorted(total["rejects"], key=_reject_order)[:MAX_REJECT_EXAMPLES]
    total["kept_fraction"] = {
        s: round(total["texts_kept"][s] / total["texts"][s], 6) if total["texts"][s] else None for s in SOURCES
    }
    total["histogram_edges"] = [round(i / HISTOGRAM_BINS, 4) for i in range(HISTOGRAM_BINS + 1)]
    return total


SOURCE_COLUMN_BINS = 10
FINE_BINS = 4096  # the resolution of the bins' edges: 1/4096 of the column's range


def source_column_stats(index_path: Path, texts_path: Path, carried: list[Any]) -> dict[str, Any]:
    """How CapFilt's decisions fall along each numeric source-list column the version carries (a LAION / DataComp
    CLIP score): over up to SOURCE_COLUMN_BINS bins of about equal numbers of samples (deciles: a CLIP score's
    useful range is narrow, and equal-width bins over a range stretched by one outlier would put most samples in
    one bin), the samples in each, how many kept their web text (did the ITM filter agree with the list's score?)
    and how many were kept at all; samples without a value (null, NaN or infinite) are counted as `missing`.

    Two passes over those index columns and the texts' `kept` column (a byte a text; each sample's web text is
    its first, `decide_texts`, at its `texts_row`): the range, then counts in FINE_BINS equal bins of it, merged
    into the deciles' bins. A bin's edges are fine-bin edges, so a sample is in bin i when edges[i] <= value <
    edges[i + 1] (the last bin holds its upper edge); many equal values (a fine bin past a decile) give fewer bins."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from datasets_manifests.index import is_numeric, iter_parquet

    numeric = [field.name for field in carried if is_numeric(field.type)]
    if not numeric:
        return {}
    ranges: dict[str, list[float]] = {}
    for batch in iter_parquet(index_path, numeric):
        for name in numeric:
            values = _floats(batch.column(name))
            values = values[np.isfinite(values)]
            if values.size:
                seen = ranges.setdefault(name, [float(values.min()), float(values.max())])
                seen[:] = [min(seen[0], float(values.min())), max(seen[1], float(values.max()))]
    web_kept = pq.read_table(texts_path, columns=["kept"]).column("kept").to_numpy().astype(bool)
    kinds = ("samples", "web_text_kept", "samples_kept")
    out: dict[str, Any] = {}
    for name in numeric:
        low, high = ranges.get(name, [0.0, 0.0])
        fine_edges = np.linspace(low, high, FINE_BINS + 1)
        fine = {kind: np.zeros(FINE_BINS, dtype=np.int64) for kind in kinds}
        missing = 0
        for batch in iter_parquet(index_path, [name, "texts_row", "status"]):
            values = _floats(batch.column(name))
            has_value = np.isfinite(values)  # null (NaN in numpy), NaN or infinite: no value
            missing += int((~has_value).sum())
            bins = np.clip(np.searchsorted(fine_edges, values[has_value], side="right") - 1, 0, FINE_BINS - 1)
            rows = batch.column("texts_row").to_numpy(zero_copy_only=False)[has_value].astype(np.int64)
            ok = pc.equal(batch.column("status"), "ok").to_numpy(zero_copy_only=False)[has_value]
            fine["samples"] += np.bincount(bins, minlength=FINE_BINS)
            for kind, flags in (("web_text_kept", web_kept[rows]), ("samples_kept", ok)):
                fine[kind] += np.bincount(bins, weights=flags, minlength=FINE_BINS).astype(np.int64)
        starts = _decile_starts(fine["samples"]) if high > low else np.array([0])
        counts = {kind: np.add.reduceat(values, starts) for kind, values in fine.items()}
        edges = [float(fine_edges[start]) for start in starts] + [float(high)]
        out[name] = {"edges": edges, "bins": "deciles", "missing": missing,  # (equal-width bins before: no "bins")
                     **{kind: values.tolist() for kind, values in counts.items()}}  # fmt: skip
    return out


def _floats(column: Any) -> Any:
    """A numeric column as float64, a null as NaN (so `np.isfinite` says which samples have a value)."""
    import numpy as np

    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


def _decile_starts(samples: Any) -> Any:
    """The first fine bin of each of up to SOURCE_COLUMN_BINS bins of about equal sample counts (`samples`: the
    count in each fine bin): a bin ends with the fine bin where the running count reaches the next decile."""
    import numpy as np

    running = np.cumsum(samples)
    total = int(running[-1])
    if total == 0:
        return np.array([0])
    targets = total * np.arange(1, SOURCE_COLUMN_BINS) / SOURCE_COLUMN_BINS
    ends = np.searchsorted(running, targets, side="left") + 1  # one past the fine bin that reaches each decile
    starts = np.unique(np.concatenate([[0], ends[ends < len(samples)]]))
    # A bin that would start after the last sample (the running count already whole) is merged into the one before.
    return starts[np.concatenate([[True], running[starts[1:] - 1] < total])]


def _reject_order(reject: dict[str, Any]) -> str:
    # A hash order: a spread-out, reproducible sample rather than the first keys of the first shard.
    return hashlib.sha1(f"{reject['key']}/{reject['source']}/{reject['text']}".encode()).hexdigest()


def dumps(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


# ------------------------------------------------------------------------------------------------ driver


class CapFiltError(ValueError):
    """Inputs the stage cannot use (wrong model kind, shard/manifest mismatch); the message names them."""

    def __init__(self, message: str) -> None:
        # The CLI prints this as its one error line (no traceback): a newline in a key or path must not split it.
        super().__init__(" ".join(message.split()))


def check_storage_reachable(nodes: list[dict[str, Any]], urls: list[str], *, shared_filesystem: bool = False) -> None:
    """Fail when a multi-node Ray cluster would give its workers paths that may exist only on this machine.

    `nodes` is `ray.nodes()`; `urls` are what decode tasks and actors open (shard URLs, model directories).
    """
    problem = None if shared_filesystem else runtime.unreachable_local_inputs(nodes, urls)
    if problem:
        raise CapFiltError(problem)


@dataclass(frozen=True, slots=True)
class ShardPlan:
    index: int
    path: str  # relative path in the input version; the output shard keeps it
    url: str
    split: str | None
    num_samples: int
    bytes: int | None = None  # the shard's size in its manifest (the shard cache checks a download against it)


def run_capfilt(
    config: CapFiltConfig,
    dataset_ref: str | Manifest,
    *,
    captioner_ref: str | Manifest,
    filter_ref: str | Manifest,
    name: str,
    registry: Registry | None = None,
) -> Manifest:
    """Caption + filter every shard of `dataset_ref`; publish the bootstrapped dataset version `name`.

    Re-running with the same inputs and config returns the published version (no work); after a crash it
    redoes only the shards without a completion marker.
    """
    from datasets_manifests.index import source_columns
    from datasets_manifests.manifest import cache_key
    from datasets_manifests.registry import Registry, check_name, now_utc
    from pipelines.config import config_hash

    check_name(name)
    registry = registry or Registry()
    dataset = registry.resolve(dataset_ref, kind="dataset")
    captioner = registry.resolve(captioner_ref, kind="model")
    filter_model = registry.resolve(filter_ref, kind="model")
    models = {
        "captioner": _model_source(registry, captioner, ("caption",)),
        "filter": _model_source(registry, filter_model, ("itm", "retrieval")),
    }
    image_size = config.image_size or models["captioner"]["image_size"]
    for role, source in models.items():
        if source["image_size"] != image_size:
            log.warning("capfilt: the %s %s was trained at %d px and runs at %d px: its position embeddings are "
                        "interpolated", role, source["ref"], source["image_size"], image_size)  # fmt: skip
    key = cache_key(STAGE, [dataset.id, captioner.id, filter_model.id], config_hash(config.cache_relevant()))
    cached = registry.find_cached("dataset", name, key)
    if cached is not None:
        _remove_leftover_work(registry, key)
        return cached
    if config.ground_truth:  # read at the publish: a wrong path found then cost the whole run
        from pipelines.tasks import capfilt_quality

        capfilt_quality.check_ground_truth(config.ground_truth)
    started = now_utc()
    registry.note_work(key, stage=STAGE, name=name, parents=[dataset, captioner, filter_model], shared=True)
    # Shards, index parts and markers go where every node's writer tasks reach (inside a remote registry's
    # store, or the local registry's own disk); the merged index, texts and stats to this machine's work dir.
    shared = registry.shared_work_url(key)
    shards = plan_shards(registry, dataset, config)
    warn_uncached_remote(shards, config.compute)
    pending = pending_shards(shared, shards)
    refs = {"captioner": captioner.ref, "filter": filter_model.ref}
    carried = source_columns(registry, dataset)  # the source list's columns (the download's save_additional_columns)
    resumed = len(shards) - len(pending)
    total_images = sum(shard.num_samples for shard in shards)
    with StageProgress("capfilt", total_images, "img", initial=total_images - sum(s.num_samples for s in pending),
                       logger=log) as progress:  # fmt: skip
        def on_batch(images: int, written: int) -> None:
            progress.update(images, shards=f"{resumed + written}/{len(shards)} written")

        perf = process_shards(config, pending, models, int(image_size), shared, refs, carried, on_batch)
    perf["shards_total"], perf["shards_resumed"] = len(shards), resumed
    return _publish(registry, config, key, shared, shards, name, started, perf, [dataset, captioner, filter_model],
                    carried)  # fmt: skip


def _remove_leftover_work(registry: Registry, key: str) -> None:
    """A run stopped after its publish and before its clean-up left its work dir (and, with a remote registry, its
    work prefix in the store: terabytes of staged shards at scale). The version exists, so the rerun that finds
    it removes them."""
    for place in registry.remove_work(key):
        log.info("capfilt: removed %s, left by a run stopped after its publish", place)


def _model_source(registry: Registry, manifest: Manifest, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Where an actor loads a model version from, after checking it is the right kind of model."""
    names = {entry.path for entry in manifest.files}
    if not {"model.safetensors", "config.json"} <= names:
        raise CapFiltError(f"{manifest.ref} is not a model version (needs model.safetensors + config.json)")
    with registry.open(manifest, "config.json", "r") as handle:
        saved = json.load(handle)
    if saved.get("kind") not in kinds:
        raise CapFiltError(f"{manifest.ref} is a '{saved.get('kind')}' model; expected {' or '.join(kinds)}")
    source: dict[str, Any] = {"ref": manifest.ref, "kind": saved["kind"],
                              "image_size": saved["config"]["vision"]["image_size"]}  # fmt: skip
    if registry.is_local:
        source["dir"] = str(registry.local_path(manifest, "config.json").parent)
    else:
        source.update({name: registry.url_of(manifest, name) for name in ("model.safetensors", "config.json")})
    return source


def plan_shards(registry: Registry, dataset: Manifest, config: CapFiltConfig) -> list[ShardPlan]:
    entries = sorted(dataset.shards(), key=lambda entry: entry.path)
    if not entries:
        raise CapFiltError(f"{dataset.ref} has no shards to caption")
    if config.max_shards:
        entries = entries[: config.max_shards]
    # One listing of the version: refuse now, not when a decode task reaches a damaged shard.
    damaged = list(registry.absent(dataset, entries).values())
    if damaged:
        from datasets_manifests.registry import first_few

        raise CapFiltError(f"{dataset.ref}: {len(damaged)} of its {len(entries)} shards are damaged in {registry.url} "
                           f"({first_few(damaged)}); `blip data verify {dataset.ref}` checks every file")
    plans = []
    for index, entry in enumerate(entries):
        url = registry.url_of(dataset, entry.path)
        count = entry.num_samples
        if count is None:
            import fsspec

            with fsspec.open(url, "rb") as handle:
                count = count_tar_samples(handle)
        plans.append(ShardPlan(index, entry.path, url, entry.split, int(count), entry.bytes))
    return plans


def cache_setting(compute: ComputeConfig) -> tuple[str, int] | None:
    """(directory, bytes) of the node-local input shard cache the decode and writer tasks share; None: off."""
    if not compute.shard_cache_dir:
        return None
    return compute.shard_cache_dir, int(compute.shard_cache_gb * 2**30)


@contextlib.contextmanager
def open_input_shard(url: str, size: int | None, cache: tuple[str, int] | None) -> Iterator[IO[bytes]]:
    """An input shard, opened for one front-to-back read: through this node's shard cache (downloaded once a node,
    read while it downloads), or directly."""
    node_cache = ShardCache.from_setting(cache, "compute")
    if node_cache is None:
        import fsspec

        with fsspec.open(url, "rb") as handle:
            yield handle
        return
    with node_cache.open_streaming(url, size) as handle:
        yield handle


def discard_input_shard(url: str, cache: tuple[str, int] | None) -> None:
    """Remove a written shard's node-local copy: nothing in this stage reads it again."""
    node_cache = ShardCache.from_setting(cache, "compute")
    if node_cache is not None:
        node_cache.discard(url)


def warn_uncached_remote(shards: list[ShardPlan], compute: ComputeConfig) -> None:
    remote = [shard.url for shard in shards if not is_local(shard.url)]
    if remote and not compute.shard_cache_dir:
        log.warning("capfilt: the input shards are remote (%s ...) and compute.shard_cache_dir is not set: each is "
                    "downloaded twice, by its decode task and by its writer task; set compute.shard_cache_dir to a "
                    "directory on the nodes' local disks", remote[0].rsplit("/", 1)[0])  # fmt: skip


def marker_relpath(shard: ShardPlan) -> str:
    return f"done/{shard.path.replace('/', '__')}.json"


def pending_shards(shared: str, shards: list[ShardPlan]) -> list[ShardPlan]:
    """The shards without both a marker and their tar under the run's work dir (a marker without its tar: a
    publish killed mid-move took the file; redo that shard). One listing of the work dir, not two stats a shard:
    ~26k requests, minutes on an object store, before a 129M-image run could start or resume."""
    fs, root = _url_to_fs(shared)
    base = f"{root}/"
    present = {path[len(base):] for path in fs.find(root) if path.startswith(base)} if fs.exists(root) else set()
    return [shard for shard in shards if not (marker_relpath(shard) in present and shard.path in present)]


def _url_to_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path in it without a trailing slash) of a local path or URL."""
    from datasets_manifests.sources import url_to_fs

    fs, path = url_to_fs(url)
    return fs, path.rstrip("/")


def decode_items(shards: list[ShardPlan]) -> list[dict[str, Any]]:
    """Decode tasks: one per non-empty shard, read once front to back (see `_ray_capfilt.decode_shard`)."""
    return [{"shard_index": shard.index, "path": shard.path, "url": shard.url, "expected": shard.num_samples,
             "bytes": -1 if shard.bytes is None else shard.bytes} for shard in shards if shard.num_samples]  # fmt: skip


def process_shards(config: CapFiltConfig, shards: list[ShardPlan], models: dict[str, Any], image_size: int,
                   work: str, refs: dict[str, str], carried: list[Any] | None = None,
                   on_batch: Callable[[int, int], None] | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the Ray pipeline over `shards`; each shard's outputs are written by a Ray task once its last batch is in.
    `on_batch(images, shards_written)` follows the run (the images of each model batch as it comes back, and how
    many shards the writers have finished so far).

    The driver only routes the model results (a few hundred bytes per image): reading each input shard again,
    building and hashing its output tar happen in writer tasks on the cluster's CPUs, writing under `work` (a
    path or URL every node reaches: `Registry.shared_work_url`). With `compute.shard_cache_dir` each writer task
    is placed on the node that decoded its shard (soft: elsewhere if that node is gone) and reads the node's copy.
    """
    from pipelines.tasks import _ray_capfilt

    perf: dict[str, float] = {"images": 0, "wall_s": 0.0, "decode_s": 0.0}
    by_index = {shard.index: shard for shard in shards}
    batches: dict[int, dict[int, list[dict[str, Any]]]] = {shard.index: {} for shard in shards}
    received = {shard.index: 0 for shard in shards}
    nodes: dict[int, str] = {}  # the node that decoded each shard: its writer goes there, to the cached copy
    began = time.perf_counter()
    writers = _ray_capfilt.ShardWriters(config, work, refs, carried)
    try:
        for shard in shards:
            if shard.num_samples == 0:
                writers.submit(shard, [])
        items = decode_items(shards)
        for row in _ray_capfilt.run_pipeline(config, items, models, image_size) if items else ():
            results = json.loads(row["results"])
            if not perf["images"]:  # start-up: Ray scheduling, actor construction, model loading, first decode
                perf["first_batch_s"], perf["first_batch_images"] = time.perf_counter() - began, len(results)
            index = int(row["shard_index"])
            nodes[index] = str(row.get("node") or "")
            batches[index][int(row["start"])] = results
            received[index] += len(results)
            perf["images"] += len(results)
            for name, value in row.items():
                if name.endswith("_s"):
                    perf[name] = perf.get(name, 0.0) + float(value)
            if received[index] == by_index[index].num_samples:
                ordered = [r for start in sorted(batches[index]) for r in batches[index][start]]
                batches[index] = {}
                writers.submit(by_index[index], ordered, node=nodes.get(index))
            if on_batch:
                on_batch(len(results), len(writers.markers))
        markers = writers.finish()
        if on_batch:
            on_batch(0, len(markers))
    except Exception:
        writers.settle()  # no write of this run goes on beside a rerun's
        raise
    perf["wall_s"] = time.perf_counter() - began
    perf["write_s"] = sum(float(marker.get("write_s", 0.0)) for marker in markers)  # writer-task time, all tasks
    perf["writes_on_decode_node"] = writers.placed
    missing = [s.path for s in shards if received[s.index] != s.num_samples]
    if missing:
        raise CapFiltError(f"shards not fully processed: {', '.join(missing[:5])}")
    return _perf_summary(perf)


def _perf_summary(perf: dict[str, float]) -> dict[str, Any]:
    """Throughput and the accelerator's busy share: time computing vs time an actor waited for input."""
    summary: dict[str, Any] = {k: round(v, 4) if isinstance(v, float) else v for k, v in perf.items()}
    images, wall = perf["images"], perf["wall_s"]
    summary["images_per_s"] = round(images / wall, 3) if wall and images else None
    steady_images, steady_wall = images - perf.get("first_batch_images", 0), wall - perf.get("first_batch_s", 0.0)
    # After the first batch is out: the rate the pipeline sustains once actors are up (what scales to 129M).
    summary["steady_images_per_s"] = round(steady_images / steady_wall, 3) if steady_images and steady_wall > 0 else None
    for prefix in ("", "caption_"):
        busy, idle = perf.get(f"{prefix}compute_s", 0.0), perf.get(f"{prefix}wait_s", 0.0)
        if busy:
            summary[f"{prefix}actor_busy_fraction"] = round(busy / (busy + idle), 4)
    if images:
        summary["decode_s_per_image"] = round(perf["decode_s"] / images, 6)
    return summary


def finish_shard(work: str, shard: ShardPlan, results: list[dict[str, Any]], config: CapFiltConfig,
                 refs: dict[str, str], carried: list[Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write one input shard's outputs (tar, index part, texts part) and, last, its completion marker. The
    `carried` source columns (pyarrow fields: `index.source_columns`) go from each sample's json to its index row.

    Runs in a Ray task (`_ray_capfilt.ShardWriters`), once per input shard; idempotent (temporary names, the
    marker last), so a task retried after its worker died writes the same bytes. The input shard is streamed
    into the output tar one sample at a time: a 10k-image shard is never held in memory whole. `work` is a local
    path or a URL in an object store (there each file appears whole when its upload completes).
    """
    from datasets_manifests.index import write_index, write_texts

    began = time.perf_counter()
    by_key = {result["key"]: result for result in results}
    index_rows: list[dict[str, Any]] = []
    text_rows: list[dict[str, Any]] = []

    cache = cache_setting(config.compute)

    def members() -> Iterator[tuple[str, bytes]]:
        with open_input_shard(shard.url, shard.bytes, cache) as handle:
            for _, key, sample in iter_tar_samples(handle):
                if key not in by_key:
                    raise CapFiltError(f"{shard.path}: sample {key!r} has no CapFilt result")
                records, row, files = build_sample(key, sample, by_key.pop(key), shard, config, refs,
                                                   [field.name for field in carried or []])  # fmt: skip
                text_rows.extend(records)
                index_rows.append(row)
                yield from files
        if by_key:
            raise CapFiltError(f"{shard.path}: results for keys not in the shard: {sorted(by_key)[:3]}")

    fs, root = _url_to_fs(work)
    written = write_tar(f"{root}/{shard.path}", members(), fs)
    first_text = 0
    for row in index_rows:  # byte offsets of the .jpg members, for random access from the index
        if row["status"] == "ok":
            row["jpg_offset"], row["jpg_bytes"] = written.data_offsets[f"{row['key']}.jpg"]
        # Where the sample's texts start in this part's texts file (the publish makes it a row of texts.parquet).
        row["texts_row"], first_text = first_text, first_text + row["texts_count"]
    stem = shard.path.replace("/", "__")
    write_index(typed_table(index_rows, "index", carried), f"{work}/parts/{stem}.index.parquet")
    write_texts(typed_table(text_rows, "texts"), f"{work}/parts/{stem}.texts.parquet")
    # The tar's digest travels in the marker to the publish, which then does not read every shard back.
    marker = {"path": shard.path, "split": shard.split, "num_samples": sum(row["status"] == "ok" for row in index_rows),
              "sha256": written.sha256, "bytes": written.bytes, "stats": shard_stats(text_rows, index_rows),
              "write_s": round(time.perf_counter() - began, 4)}  # fmt: skip
    with atomic_output(f"{root}/{marker_relpath(shard)}", fs) as handle:  # the commit of this shard
        handle.write(json.dumps(marker, sort_keys=True).encode())
    discard_input_shard(shard.url, cache)
    return marker


# The columns this stage adds to index.parquet and texts.parquet, typed here: a part whose values are all null
# (beam search has no seeds; most shards have no error_detail) would otherwise get Arrow's null type.
EXTRA_COLUMNS = {
    "index": {"error_detail": "string", "texts_count": "int64", "texts_kept": "int64", "texts_row": "int64"},
    "texts": {"captioner": "string", "filter": "string", "sample_index": "int64", "seed": "int64"},
}


def part_schema(kind: Literal["index", "texts"], carried: list[Any] | None = None) -> Any:
    """The contract columns (datasets_manifests.index), this stage's extras, typed, and (index) the `carried`
    source columns."""
    import pyarrow as pa

    from datasets_manifests.index import INDEX_SCHEMA, TEXTS_SCHEMA

    contract = INDEX_SCHEMA if kind == "index" else TEXTS_SCHEMA
    extras = [pa.field(name, pa.type_for_alias(alias)) for name, alias in sorted(EXTRA_COLUMNS[kind].items())]
    return pa.schema([*contract, *extras, *(carried or [] if kind == "index" else [])])


def typed_table(rows: list[dict[str, Any]], kind: Literal["index", "texts"], carried: list[Any] | None = None) -> Any:
    """Rows -> an Arrow table of `part_schema(kind, carried)`."""
    import pyarrow as pa

    schema = part_schema(kind, carried)
    unknown = sorted({name for row in rows for name in row} - set(schema.names))
    if unknown:  # from_pylist would drop them silently
        raise ValueError(f"typed_table({kind}): columns without a declared type: {', '.join(unknown)}")
    return pa.Table.from_pylist(rows, schema=schema)


def build_sample(key: str, sample: dict[str, bytes], result: dict[str, Any], shard: ShardPlan,
                 config: CapFiltConfig, refs: dict[str, str], carried: list[str] | None = None
                 ) -> tuple[list[dict], dict[str, Any], list[tuple[str, bytes]]]:  # fmt: skip
    """Text records, index row and output tar members (empty when dropped) of one sample; its index row has the
    `carried` source columns of its json."""
    try:
        meta = json.loads(sample.get("json", b"{}") or b"{}")
    except ValueError:
        meta = {}
    if not isinstance(meta, dict):  # valid JSON but not an object (a damaged shard): no metadata, as unreadable
        meta = {}
    error = result["error"]
    reason = error.split(":", 1)[0] if error else None
    records = decide_texts(key, result["web_text"], result["synthetic"], result["scores"], result["seeds"], config,
                           captioner=refs["captioner"], filter_ref=refs["filter"], image_error=reason)  # fmt: skip
    best = choose_caption(records)
    drop_reason = reason or (None if best else "no_text_kept")
    row = {
        "key": key, "url": meta.get("url"), "image_sha256": meta.get("image_sha256"), "width": meta.get("width"),
        "height": meta.get("height"), "caption": best["text"] if best else None, "raw_caption": meta.get("raw_caption"),
        "caption_source": best["source"] if best else None, "split": shard.split,
        "shard": None if drop_reason else shard.path, "jpg_offset": None, "jpg_bytes": None,
        "status": "dropped" if drop_reason else "ok", "drop_reason": drop_reason, "error_detail": error,
        "texts_kept": sum(r["kept"] for r in records), "texts_count": len(records),
        **{name: meta.get(name) for name in carried or []},
    }  # fmt: skip
    if drop_reason:
        return records, row, []
    document = {
        **meta, "key": key, "caption": best["text"], "caption_source": best["source"],
        "captions": [r["text"] for r in records if r["kept"]],
        "texts": [{k: r[k] for k in ("text", "source", "itm_score", "kept", "drop_reason", "seed", "sample_index")}
                  for r in records],
        "capfilt": {"captioner": refs["captioner"], "filter": refs["filter"], "seed": _base_seed(config.captioner),
                    "sampling": _sampling(config.captioner), "thresholds": _thresholds(config.filter)},
    }  # fmt: skip
    files = [(f"{key}.jpg", sample["jpg"]), (f"{key}.json", dumps(document)), (f"{key}.txt", best["text"].encode())]
    return records, row, files


def _sampling(captioner: CaptionerConfig) -> dict[str, Any]:
    """The generation settings the captions were really made with (enough to regenerate one from its seed)."""
    fields = ["method", "prompt", "min_length", "max_length", "num_captions", "max_words"]
    if captioner.method == "nucleus":
        return {name: getattr(captioner, name) for name in [*fields, "top_p", "top_k", "repetition_penalty"]}
    return {**{name: getattr(captioner, name) for name in [*fields, "num_beams"]},
            "repetition_penalty": BEAM_REPETITION_PENALTY}  # fmt: skip


def _base_seed(captioner: CaptionerConfig) -> int | None:
    return captioner.seed if captioner.method == "nucleus" else None  # beam search draws nothing


def _thresholds(filter_config: FilterConfig) -> dict[str, float]:
    return {source: filter_config.threshold_for(source) for source in SOURCES}


def _publish(registry: Registry, config: CapFiltConfig, key: str, shared: str, shards: list[ShardPlan], name: str,
             started: str, perf: dict[str, Any], parents: list[Manifest],
             carried: list[Any] | None = None) -> Manifest:  # fmt: skip
    """Concatenate the per-shard parts, add stats (and quality when ground truth exists), publish, clean up.

    The merged index, texts and stats are written to this machine's work dir; the shards are published from
    `shared` where the writer tasks left them (a remote registry copies them inside its store)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from datasets_manifests.index import SOURCE_COLUMNS, write_index_batches, write_texts_batches
    from datasets_manifests.manifest import Producer
    from datasets_manifests.registry import REMOTE_THREADS, in_threads
    from pipelines.config import config_hash, to_dict
    from pipelines.tasks import capfilt_quality

    fs, root = _url_to_fs(shared)
    work = registry.work_dir(key)  # == shared for a local registry
    # One small read a shard (13k at 129M): on an object store each waits on the network, so they overlap.
    markers = [json.loads(text) for text in in_threads(fs.cat_file, [f"{root}/{marker_relpath(s)}" for s in shards],
                                                          REMOTE_THREADS)]  # fmt: skip
    stems = [shard.path.replace("/", "__") for shard in shards]

    def read_part(path: str) -> Any:
        with fs.open(path, "rb") as handle:
            return pq.read_table(handle)

    def parts(kind: str) -> Iterator[Any]:  # a few shards' parts at a time: the whole index may not fit in memory
        yield from in_threads(read_part, [f"{root}/parts/{stem}.{kind}.parquet" for stem in stems], REMOTE_THREADS)

    def index_parts() -> Iterator[Any]:  # each part's texts_row made a row of the whole texts.parquet
        first_text = 0
        for table in parts("index"):
            column = table.schema.get_field_index("texts_row")
            yield table.set_column(column, "texts_row", pc.add(table.column(column), first_text))
            first_text += int(pc.sum(table.column("texts_count")).as_py() or 0)

    # Keys are unique across parts: each shard holds its own keys of the input version's index.
    write_index_batches(index_parts(), work / "index.parquet", part_schema("index", carried), in_key_order=False)
    write_texts_batches(parts("texts"), work / "texts.parquet", part_schema("texts"))
    stats = merge_stats([marker["stats"] for marker in markers])
    quality = capfilt_quality.evaluate(registry, parents[0], config.ground_truth,
                                       lambda: (pq.read_table(work / "texts.parquet"), pq.read_table(work / "index.parquet")))
    if quality is not None:
        stats["quality"] = quality
    by_source_column = source_column_stats(work / "index.parquet", work / "texts.parquet", carried or [])
    if by_source_column:
        stats["by_source_column"] = by_source_column
    stats["throughput"] = perf
    (work / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True))
    # Shard digests come from the writer tasks (hashed as written; a marker of an older run may lack them).
    files = [{"path": m["path"], "role": "shard", "num_samples": m["num_samples"], "split": m["split"],
              **{k: m[k] for k in ("sha256", "bytes") if k in m}} for m in markers]  # fmt: skip
    files += [{"path": "index.parquet", "role": "index"}, {"path": "texts.parquet", "role": "index"},
              {"path": "stats.json", "role": "stats"}]  # fmt: skip
    splits: dict[str, int] = {}
    for marker in markers:
        splits[marker["split"] or "train"] = splits.get(marker["split"] or "train", 0) + marker["num_samples"]
    manifest = registry.publish(
        kind="dataset", name=name, staging_dir=work, files=files, parents=parents, digests_from_writer=True,
        remote_staging=None if registry.is_local else shared,
        producer=Producer(stage=STAGE, config=to_dict(config), config_hash=config_hash(config), cache_key=key,
                          started_at=started),
        splits=splits,
        counts={"input": stats["samples"], "kept": stats["samples_kept"], "dropped": stats["samples"] - stats["samples_kept"],
                **{f"texts_{s}": stats["texts"][s] for s in SOURCES},
                **{f"texts_{s}_kept": stats["texts_kept"][s] for s in SOURCES}},
        drop_reasons=stats["sample_drop_reasons"],
        # The sample of rejected texts only in stats.json: a file a takedown can rewrite (a manifest cannot change).
        stats={"capfilt": {k: v for k, v in stats.items() if k != "rejects"}},
        sample_schema={"jpg": "original JPEG bytes (unchanged)",
                       "txt": "the kept text with the highest ITM score",
                       "json": "input metadata + captions (kept texts) + texts (all, with source, itm_score, kept, "
                               "drop_reason, seed, sample_index) + capfilt (model versions, sampling, thresholds)"},
        metadata={"captioner": parents[1].ref, "filter": parents[2].ref, "sampling": _sampling(config.captioner),
                  "seed": _base_seed(config.captioner), "thresholds": _thresholds(config.filter),
                  "training_texts": "one sample per image: json.captions lists every kept text (web + synthetic, "
                                    "the BLIP union); a reader may sample one per step; txt = best kept text",
                  **({SOURCE_COLUMNS: [field.name for field in carried]} if carried else {})},
    )  # fmt: skip
    registry.remove_work(key)  # the merged files here, and the shared work prefix inside a remote store
    return manifest
