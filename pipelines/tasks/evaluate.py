"""The evaluation stage: a task model version + a downstream dataset version -> an evaluation version.

Follows BLIP's `train_retrieval.py:evaluation()` / `itm_eval`, `train_caption.py:evaluate()` + `coco_caption_eval`
(Li et al. 2022, salesforce/BLIP; shared/docs/blip_spec.md §4.1, §4.2):

- retrieval: every image and text is encoded once (normalised ITC features; ViT token sequences kept for ITM),
  cosine similarities rank the candidates, and the top-`k_test` of every query are re-ranked with
  score = ITM positive logit + ITC cosine (`retrieval_eval`, batched across queries and candidates). Encoding and
  re-ranking are split by row ranges over the workers (BLIP splits rows over GPUs and all-reduces), each worker
  returns its rows, and the driver assembles both matrices and computes recall@1/5/10 and r_mean.
- captioning: beam search 3, max 20, min 5 (prompt 'a picture of ' counted in the lengths), the images split over
  the workers; scored with pycocoevalcap (Bleu_1..4, METEOR, ROUGE_L, CIDEr; SPICE reported unavailable when its
  CoreNLP models are absent) against the COCO-caption GT file; the result file is published.
- NoCaps (`eval_nocaps.py`, a `format: nocaps` set): the same generation (BLIP nocaps.yaml: repetition penalty
  1.1, configs/evaluate/caption_nocaps.yaml); `nocaps_<split>_results.json` in the official server format is
  published and no metric is computed here (the references are held by the EvalAI server).

Implemented in `evaluate_tasks.py`:
- VQA: 'rank' over answer_list.json (k_test 128) or 'generate' (beam 3, max 10, min 1); split val is scored with
  the VQA accuracy against the official val questions/annotations, and every split writes `vqa_result.json`
  (`[{"question_id", "answer"}]`, the test-dev/test-std server file).
- NLVR2: accuracy on dev (val) or test.
- video (MSRVTT, zero-shot): 8 uniform frames per clip, the normalised mean of the frames' projected CLS features
  as the ITC embedding, all frames' tokens as ITM memory; the retrieval metrics plus median rank.
Workers (`ModelWorkers`) are `num_workers` Ray actors, each holding the model once on its device (`device`,
`gpus_per_worker`, bf16 autocast with `precision: bf16` on CUDA); the model travels to them as bytes in Ray's
object store, so no worker needs the driver's filesystem. `num_workers: 0` runs the same worker code in this
process (tests, benchmarks). Idempotent via the cache key.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pipelines.config import check_range, config_hash, to_dict
from pipelines.runtime import process_temp_dir

if TYPE_CHECKING:
    from pipelines.progress import StageProgress

log = logging.getLogger(__name__)

EvalTask = Literal["retrieval", "caption", "vqa", "nlvr", "video"]
MODEL_KIND = {"retrieval": "retrieval", "caption": "caption", "vqa": "vqa", "nlvr": "nlvr", "video": "retrieval"}
K_TEST = {"coco": 256, "flickr": 128, "msrvtt": 128}  # BLIP retrieval_coco.yaml / retrieval_flickr.yaml (MSRVTT: 128)


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig:
    """One evaluation (configs/evaluate/*.yaml)."""

    task: EvalTask  # retrieval | caption | vqa | nlvr | video
    split: str = "test"  # val | test
    k_test: int | None = None  # retrieval re-rank candidates; None: 256 COCO, 128 Flickr30k / MSRVTT
    image_batch_size: int = 64  # images per ViT forward (BLIP batch_size_test 64)
    text_batch_size: int = 256  # texts per text-encoder forward (BLIP: 256)
    itm_pairs_per_batch: int = 1024  # (query, candidate) pairs per ITM forward in the re-ranking (small forwards are overhead-bound)
    num_beams: int = 3  # captioning (BLIP caption_coco.yaml)
    max_length: int = 20  # includes the 4 prompt tokens
    min_length: int = 5
    repetition_penalty: float = 1.0  # BLIP COCO 1.0 (NoCaps 1.1)
    caption_batch_size: int = 16  # images per generate call
    caption_metrics: tuple[str, ...] = ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
    vqa_inference: Literal["rank", "generate"] = "rank"  # BLIP vqa.yaml: rank over answer_list.json
    vqa_k_test: int = 128  # rank: candidates kept after the first-token step
    vqa_batch_size: int = 32  # BLIP batch_size_test 32
    num_frames: int = 8  # video: uniformly sampled frames per clip (BLIP num_frm_test 8)
    num_workers: int = 2  # Ray actors sharing the rows, each loads the model once (0 = everything in this process)
    cpus_per_worker: float = 1.0  # fractional values let workers share CPUs with other work
    gpus_per_worker: float = 0.0  # GPU share of each Ray worker (0.5: two workers per GPU); 0 = CPU workers
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the worker got a GPU, else cpu
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: autocast on CUDA (CPU always runs fp32)
    max_images: int | None = None  # evaluate only the first N images of the split (smoke runs); None = all

    def __post_init__(self) -> None:
        if self.task not in MODEL_KIND:
            raise ValueError(f"'task' = {self.task!r}: choose one of {', '.join(MODEL_KIND)}")
        if self.split not in ("val", "test"):
            raise ValueError(f"'split' = {self.split!r}: choose val or test")
        if self.k_test is not None:
            check_range("evaluate", "k_test", self.k_test, 1)
        for name in ("image_batch_size", "text_batch_size", "itm_pairs_per_batch", "num_beams", "caption_batch_size"):
            check_range("evaluate", name, getattr(self, name), 1)
        check_range("evaluate", "min_length", self.min_length, 1)
        check_range("evaluate", "max_length", self.max_length, self.min_length)
        check_range("evaluate", "num_workers", self.num_workers, 0)
        check_range("evaluate", "cpus_per_worker", self.cpus_per_worker, 0.01)
        check_range("evaluate", "gpus_per_worker", self.gpus_per_worker, 0)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"'device' = {self.device!r}: choose auto, cpu or cuda")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"'precision' = {self.precision!r}: choose fp32 or bf16")
        if self.device == "cuda" and self.num_workers > 0 and self.gpus_per_worker == 0:
            raise ValueError("'device' = 'cuda' with Ray workers needs 'gpus_per_worker' > 0 (Ray gives a worker "
                             "a GPU only when it asks for one)")  # fmt: skip
        if self.max_images is not None:
            check_range("evaluate", "max_images", self.max_images, 1)
        from pipelines.tasks.metrics import CAPTION_METRICS

        unknown = sorted(set(self.caption_metrics) - set(CAPTION_METRICS))
        if unknown:
            raise ValueError(f"'caption_metrics' has unknown {unknown}; choose from {list(CAPTION_METRICS)}")


# ---------------------------------------------------------------------------------------------- model + data


def load_task_model(directory: str, kind: str) -> Any:
    """A save_pretrained model as the task model `kind` (eval mode); another kind's weights load by key name
    (e.g. a pretrained model evaluated zero-shot for retrieval)."""
    from blip_models.checkpoints import build_model, config_from_dict, from_pretrained, read_pretrained_config
    from pipelines.tasks.finetune import load_weights

    saved = read_pretrained_config(directory)
    if saved["kind"] == kind:
        return from_pretrained(directory).eval()
    model = build_model(kind, config_from_dict(saved["config"]))
    load_weights(model, directory, kind)
    return model.eval()


def load_images(urls: list[str], image_size: int) -> Any:
    """Eval-transformed images (N, 3, S, S) from local paths or fsspec URLs."""
    import fsspec
    import torch
    from PIL import Image

    from blip_models.processing import eval_transform

    transform = eval_transform(image_size)
    tensors = []
    for url in urls:
        with fsspec.open(url, "rb") as handle:
            tensors.append(transform(Image.open(handle).convert("RGB")))
    return torch.stack(tensors)


EVAL_MODEL_PREFIX = "blip-eval-model-"  # where a worker materialises model bytes shipped to it
MODEL_FILES = ("config.json", "model.safetensors")  # a save_pretrained directory (blip_models.checkpoints)


def read_model_files(directory: str | Path) -> dict[str, bytes]:
    """The files of a save_pretrained directory as bytes: what Ray workers get instead of a driver-local path."""
    return {name: (Path(directory) / name).read_bytes() for name in MODEL_FILES}


def model_content_id(directory: str | Path) -> str:
    """sha256 over the files of a save_pretrained directory (the lineage id of a model given as a directory)."""
    digest = hashlib.sha256()
    for name in MODEL_FILES:
        digest.update(name.encode() + b"\0")
        with open(Path(directory) / name, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def pick_device(requested: str, has_gpu: bool) -> str:
    """cpu or cuda for `device` (auto | cpu | cuda) given whether this worker got a GPU."""
    if requested == "auto":
        return "cuda" if has_gpu else "cpu"
    if requested == "cuda" and not has_gpu:
        raise RuntimeError("device 'cuda' but this worker has no GPU (no CUDA here, or gpus_per_worker is 0)")
    return requested


def _to_cpu(value: Any) -> Any:
    """Tensors of a worker's result on the CPU, floating ones as float32 (bf16 autocast outputs); other values as
    they are. A float32 CPU tensor is returned as is, so the CPU path stays bit-identical."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    return value


class ModelWorker:
    """One worker: the task model loaded once onto its device; `run(fn, *args)` calls `fn(model, *args)` under
    no_grad (and bf16 autocast on CUDA when asked). The same class runs in this process and as a Ray actor, which
    is built without its model (`source` None) and loads it at its first `run_shipped`: the model's files come as
    an object ref in a method's argument, not the constructor's, so Ray core does not log an error line for every
    actor (a restarted actor's constructor arguments in the object store may be gone: ray#53727; `ModelWorkers`
    holds them), and an actor restarted after a crash loads them again at its next call."""

    def __init__(self, source: str | dict[str, bytes] | None, kind: str, device: str, precision: str,
                 in_ray: bool = False) -> None:
        import torch

        self.kind = kind
        has_gpu = torch.cuda.is_available()
        if in_ray:  # a Ray worker may see GPUs it was not given; use one only when Ray assigned it
            import ray

            has_gpu = has_gpu and bool(ray.get_gpu_ids())
        self.device = pick_device(device, has_gpu)
        self.autocast = self.device == "cuda" and precision == "bf16"
        self.model: Any = None
        if source is not None:
            self._load(source)
        # What `fn` of the running call said of its part (`report_part_done`): the part (the call's last argument,
        # its rows) and the share of it done, one tuple so that `progress()` (the driver asks it from another
        # thread while `run` runs) never reads one part's share with another part.
        self.part_done: tuple[Any, float] = (None, 0.0)
        self.listener: Callable[[float], None] | None = None  # in this process: `ModelWorkers.map`'s bar

    def _load(self, source: str | dict[str, bytes]) -> None:
        if isinstance(source, dict):  # bytes shipped through the object store: materialise, load, delete
            directory = process_temp_dir(EVAL_MODEL_PREFIX)  # pid-named: an actor killed meanwhile leaves it
            try:
                for name, data in source.items():
                    (directory / name).write_bytes(data)
                model = load_task_model(str(directory), self.kind)
            finally:
                shutil.rmtree(directory, ignore_errors=True)
        else:
            model = load_task_model(source, self.kind)
        self.model = model.to(self.device).eval()

    def run_shipped(self, files: list[Any], fn: Callable[..., Any], *args: Any) -> Any:
        """`run` on a Ray actor: `files` is [the object ref of the model's files], loaded at the first call (in a
        list, so that Ray does not fetch the files for every call)."""
        if self.model is None:
            import ray

            self._load(ray.get(files[0]))
        return self.run(fn, *args)

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        import torch

        self.part_done = (args[-1] if args else None), 0.0
        token = _PART_DONE.set(self._note_part_done)
        try:
            with contextlib.ExitStack() as stack:
                stack.enter_context(torch.no_grad())
                if self.autocast:
                    stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
                return _to_cpu(fn(self.model, *args))
        finally:
            _PART_DONE.reset(token)

    def _note_part_done(self, fraction: float) -> None:
        self.part_done = self.part_done[0], fraction
        if self.listener is not None:
            self.listener(fraction)

    def progress(self) -> tuple[Any, float]:
        """(the running call's part, its share done); on a Ray actor, called in its own concurrency group."""
        return self.part_done


# `ModelWorker.run` sets it for the call it runs; `report_part_done` reads it.
_PART_DONE: contextvars.ContextVar[Callable[[float], None] | None] = contextvars.ContextVar("part_done",
                                                                                            default=None)


def report_part_done(fraction: float) -> None:
    """Said by a worker's function as it goes: the share (0–1) of its part done. The driver's bar moves within a
    long part (the ITM re-ranking is one part a worker: at COCO's size, minutes to an hour each); outside a
    `ModelWorker` it does nothing."""
    hook = _PART_DONE.get()
    if hook is not None:
        hook(min(1.0, max(0.0, fraction)))


def report_batch_done(stop: int, rows: range) -> None:
    """`report_part_done` for a loop over `rows` in batches whose latest batch ended before row `stop`."""
    if len(rows):
        report_part_done((min(stop, rows.stop) - rows.start) / len(rows))


# How often `ModelWorkers.map` asks its actors how far their running parts are, while a bar is shown.
PROGRESS_POLL_S = 2.0


class ModelWorkers:
    """The model on `cfg.num_workers` Ray actors (`cpus_per_worker`, `gpus_per_worker` each), or on one
    in-process worker when `num_workers` is 0. `map(fn, shared, parts)` runs `fn(model, *shared, rows)` for every
    row range (range i on worker i mod n) and returns the results in order. Use as a context manager."""

    def __init__(self, model_dir: str, kind: str, cfg: EvaluateConfig) -> None:
        self.local: ModelWorker | None = None
        self.actors: list[Any] = []
        self.files: Any = None
        if cfg.num_workers == 0:
            self.local = ModelWorker(model_dir, kind, cfg.device, cfg.precision)
            return
        from pipelines.runtime import check_gpus_available, ensure_ray

        self.ray = ensure_ray()
        check_gpus_available(self.ray, cfg.gpus_per_worker, "gpus_per_worker")
        # The model's files, stored once; every actor reads them at its first call, on any node. Held here as long
        # as the actors live: a restarted actor (one the OOM killer took mid-evaluation) loads them again, and Ray
        # frees an object once its creator drops it (a restart then failed with ReferenceCountingAssertionError).
        self.files = self.ray.put(read_model_files(model_dir))
        # `progress` runs in its own concurrency group, beside a running `run` (the default group: one at a time).
        actor = self.ray.remote(concurrency_groups={"progress": 1})(ModelWorker).options(
            num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker, max_restarts=2, max_task_retries=2)
        self.actors = [actor.remote(None, kind, cfg.device, cfg.precision, True) for _ in range(cfg.num_workers)]

    def map(self, fn: Callable[..., Any], shared: tuple[Any, ...], parts: list[Any],
            progress: tuple[str, str] | StageProgress | None = None) -> list[Any]:  # fmt: skip
        """The results in the order of `parts`; `progress` (description, unit; or a bar to feed) shows the rows done
        as the parts finish, and within a part as far as its function says (`report_part_done`): a bar on a
        terminal, a log line a minute elsewhere (`pipelines.progress`)."""
        from pipelines.progress import StageProgress

        sizes = [_rows_in(rows) for rows in parts]
        if isinstance(progress, tuple):
            progress = StageProgress(progress[0], sum(sizes), progress[1], logger=log)
        bar = _PartsBar(progress, sizes)
        try:
            if self.local is not None:
                results = []
                for index, rows in enumerate(parts):
                    self.local.listener = functools.partial(bar.within, index)
                    try:
                        results.append(self.local.run(fn, *shared, rows))
                    finally:
                        self.local.listener = None
                    bar.finished(index)
                return results
            refs = [self.ray.put(value) for value in shared]  # stored once, read by every worker without a copy each
            calls = [self.actors[i % len(self.actors)].run_shipped.remote([self.files], fn, *refs, rows)
                     for i, rows in enumerate(parts)]  # fmt: skip
            part_of, waiting = {call: i for i, call in enumerate(calls)}, list(calls)
            results = [None] * len(calls)
            while waiting:
                done, waiting = self.ray.wait(waiting, num_returns=1,
                                              timeout=PROGRESS_POLL_S if progress is not None else None)
                if not done:
                    self._poll_parts(parts, bar)
                    continue
                # Fetched as it finishes, once (encoded features are GBs at COCO's size); a part that failed stops
                # the evaluation now, not after every other part.
                results[part_of[done[0]]] = self.ray.get(done[0])
                bar.finished(part_of[done[0]])
            return results
        finally:
            if progress is not None:
                progress.close()

    def _poll_parts(self, parts: list[Any], bar: _PartsBar) -> None:
        """Ask every actor how far its running part is; an actor that does not answer at once (restarting, or
        busy starting) is asked again next time."""
        asks = [actor.progress.options(concurrency_group="progress").remote() for actor in self.actors]
        ready, _ = self.ray.wait(asks, num_returns=len(asks), timeout=1.0)
        for ask in ready:
            with contextlib.suppress(Exception):  # a restarted actor's error: no figure this time
                part, fraction = self.ray.get(ask)
                if part in parts:
                    bar.within(parts.index(part), fraction)

    def close(self) -> None:
        for actor in self.actors:  # frees their CPUs/GPUs for the next stage at once
            self.ray.kill(actor)
        self.actors = []
        self.files = None

    def __enter__(self) -> ModelWorkers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PartsBar:
    """A `StageProgress` (or nothing) fed by part: within a part as its function reports (never its last row), the
    rest when it returns; a report for a part already done (a late poll: its rows are all shown) changes nothing."""

    def __init__(self, progress: StageProgress | None, sizes: list[int]) -> None:
        self.progress, self.sizes, self.shown = progress, sizes, [0] * len(sizes)

    def within(self, index: int, fraction: float) -> None:
        target = min(self.sizes[index] - 1, int(self.sizes[index] * fraction))
        if self.progress is not None and target > self.shown[index]:
            self.progress.update(target - self.shown[index])
            self.shown[index] = target

    def finished(self, index: int) -> None:
        if self.progress is not None and self.shown[index] < self.sizes[index]:
            self.progress.update(self.sizes[index] - self.shown[index])
        self.shown[index] = self.sizes[index]


def _rows_in(part: Any) -> int:
    """The rows a part of the work covers: a range, or a tuple of ranges (re-ranking: image rows, text rows)."""
    return sum(len(rows) for rows in part) if isinstance(part, tuple) else len(part)


# Parts a worker's share of the rows is cut into: the rows done show as the parts finish, and a worker that is
# done early takes a part from a slower one. Parts start on batch boundaries, so the results are the same.
PARTS_PER_WORKER = 4


def work_parts(num_rows: int, batch_size: int, num_workers: int) -> list[range]:
    """`batch_rows` for `num_workers` workers (0: this process), `PARTS_PER_WORKER` parts each."""
    return batch_rows(num_rows, batch_size, max(1, num_workers) * PARTS_PER_WORKER)


def batch_rows(num_rows: int, batch_size: int, num_parts: int) -> list[range]:
    """Non-empty row ranges, one per part, that start on multiples of `batch_size`: every part forms the same
    batches as one loop over all rows would, so splitting the work changes no result."""
    from pipelines.tasks.retrieval_eval import split_rows

    num_batches = -(-num_rows // batch_size)
    return [range(part.start * batch_size, min(num_rows, part.stop * batch_size))
            for part in split_rows(num_batches, num_parts) if len(part)]


# ---------------------------------------------------------------------------------------------- retrieval


def encode_text_rows(model: Any, texts: list[str], batch_size: int, rows: range) -> tuple[Any, Any, Any]:
    """(token ids, attention masks, normalised ITC features) of the texts in `rows`, `batch_size` per forward."""
    import torch

    from blip_models.tokenizer import load_tokenizer, tokenize

    tokenizer = load_tokenizer()
    device = next(model.parameters()).device
    ids, masks, feats = [], [], []
    for start in range(rows.start, rows.stop, batch_size):
        batch_ids, batch_mask = tokenize(tokenizer, texts[start:min(start + batch_size, rows.stop)], 35, "max_length")
        feats.append(model.text_features(batch_ids.to(device), batch_mask.to(device)))  # (b, E)
        ids.append(batch_ids)
        masks.append(batch_mask)
        report_batch_done(start + batch_size, rows)
    return torch.cat(ids), torch.cat(masks), torch.cat(feats)


def encode_image_rows(model: Any, image_urls: list[str], batch_size: int, rows: range) -> tuple[Any, Any]:
    """(ViT token sequences (b, 1+N, Dv), normalised ITC features (b, E)) of the images in `rows`."""
    import torch

    device = next(model.parameters()).device
    embeds, feats = [], []
    for start in range(rows.start, rows.stop, batch_size):
        pixels = load_images(image_urls[start:min(start + batch_size, rows.stop)], model.config.vision.image_size)
        batch_embeds, batch_feats = model.image_features(pixels.to(device))
        embeds.append(batch_embeds)
        feats.append(batch_feats)
        report_batch_done(start + batch_size, rows)
    return torch.cat(embeds), torch.cat(feats)


def encode_retrieval(workers: ModelWorkers, image_urls: list[str], texts: list[str],
                     cfg: EvaluateConfig) -> dict[str, Any]:
    """ITC features of all images (videos) and texts, ViT token sequences and token ids for the ITM re-ranking,
    the rows split over the workers."""
    import torch

    from pipelines.tasks.evaluate_tasks import encode_video_rows

    text_parts = workers.map(encode_text_rows, (texts, cfg.text_batch_size),
                             work_parts(len(texts), cfg.text_batch_size, cfg.num_workers),
                             progress=(f"eval {cfg.task}: texts", "texts"))  # fmt: skip
    if cfg.task == "video":  # one clip per forward: any split forms the same forwards
        image_parts = workers.map(encode_video_rows, (image_urls, cfg.num_frames),
                                  work_parts(len(image_urls), 1, cfg.num_workers),
                                  progress=(f"eval {cfg.task}: videos", "videos"))  # fmt: skip
    else:
        image_parts = workers.map(encode_image_rows, (image_urls, cfg.image_batch_size),
                                  work_parts(len(image_urls), cfg.image_batch_size, cfg.num_workers),
                                  progress=(f"eval {cfg.task}: images", "img"))  # fmt: skip
    images, texts_out = list(zip(*image_parts)), list(zip(*text_parts))
    return {"image_embeds": torch.cat(images[0]), "image_feats": torch.cat(images[1]),
            "text_ids": torch.cat(texts_out[0]), "text_mask": torch.cat(texts_out[1]),
            "text_feats": torch.cat(texts_out[2])}


def rerank_rows(model: Any, features: dict[str, Any], sims: Any, k_test: int, pairs_per_batch: int,
                rows: tuple[range, range]) -> tuple[Any, Any, int]:
    """One worker's share: its image rows of score_i2t and text rows of score_t2i (ITM logit + cosine)."""
    from pipelines.tasks.retrieval_eval import (itm_score_fn_for, retrieval_scores_from_sims,
                                                uncached_itm_score_fn_for)

    device = next(model.parameters()).device
    image_rows, text_rows = rows
    # H5's scorer projects each image's cross-attention keys/values once and scores its texts together.
    make = itm_score_fn_for if hasattr(model, "precompute_cross_kv") else uncached_itm_score_fn_for
    itm = make(model, *(features[k].to(device) for k in ("image_embeds", "text_ids", "text_mask")))
    scores = retrieval_scores_from_sims(sims, itm, k_test, pairs_per_batch=pairs_per_batch, image_rows=image_rows,
                                        text_rows=text_rows,
                                        on_pairs=lambda done, total: report_part_done(done / total))  # fmt: skip
    return (scores.score_i2t[image_rows.start:image_rows.stop], scores.score_t2i[text_rows.start:text_rows.stop],
            scores.itm_pairs)  # fmt: skip


def evaluate_retrieval(model_dir: str, image_urls: list[str], eval_set: Any, k_test: int,
                       cfg: EvaluateConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """BLIP's retrieval evaluation -> (metrics, details)."""
    import time

    import torch

    from pipelines.tasks.metrics import itm_eval
    from pipelines.tasks.retrieval_eval import similarity_matrix, split_rows

    started = time.perf_counter()
    with ModelWorkers(model_dir, "retrieval", cfg) as workers:
        features = encode_retrieval(workers, image_urls, list(eval_set.texts), cfg)
        sims = similarity_matrix(features["image_feats"], features["text_feats"])  # (N_img, N_txt)
        encoded = time.perf_counter()
        parts = max(1, cfg.num_workers)
        image_parts = split_rows(len(image_urls), parts)
        text_parts = split_rows(len(eval_set.texts), parts)
        shared = {k: features[k] for k in ("image_embeds", "text_ids", "text_mask")}
        # One part a worker, as BLIP splits the ranks: each part receives every image's ViT tokens (GBs at COCO's
        # size), and an (image, text) pair both directions rank is scored once only within a part.
        results = workers.map(rerank_rows, (shared, sims, k_test, cfg.itm_pairs_per_batch),
                              list(zip(image_parts, text_parts)), progress=(f"eval {cfg.task}: ITM re-ranking", "rows"))
    score_i2t = torch.cat([r[0] for r in results])
    score_t2i = torch.cat([r[1] for r in results])
    metrics = itm_eval(score_i2t, score_t2i, eval_set.txt2img, eval_set.img2txt)
    details = {"num_images": len(image_urls), "num_texts": len(eval_set.texts), "k_test": k_test,
               "itm_pairs": sum(r[2] for r in results), "workers": cfg.num_workers,
               "seconds_encode": round(encoded - started, 3),
               "seconds_rerank": round(time.perf_counter() - encoded, 3)}  # fmt: skip
    return metrics, details


# ---------------------------------------------------------------------------------------------- captioning


def caption_rows(model: Any, image_urls: list[str], options: dict[str, Any], rows: range) -> list[str]:
    """Captions of the images in `rows` (batched beam search). `model` may also be a model directory (loaded
    here, on the CPU: benchmarks/bench_caption_eval.py calls it so)."""
    import torch

    from blip_models.tokenizer import load_tokenizer

    if isinstance(model, (str, Path)):
        model = load_task_model(str(model), "caption")
    device = next(model.parameters()).device
    tokenizer = load_tokenizer()
    options = dict(options)
    batch = options.pop("batch_size")
    captions: list[str] = []
    for start in range(rows.start, rows.stop, batch):
        pixels = load_images(image_urls[start:min(start + batch, rows.stop)], model.config.vision.image_size)
        with torch.no_grad():
            captions += [c.strip() for c in model.generate(pixels.to(device), tokenizer, **options)]
        report_batch_done(start + batch, rows)
    return captions


def caption_gt(registry: Any, dataset: Any, layout: Any, split: str, items: list[Any]) -> tuple[list[int], dict[int, tuple[str, ...]]]:
    """(image id per eval item, id -> reference captions): the COCO GT file, or the eval annotation (Flickr)."""
    from pipelines.tasks.downstream_data import coco_image_id, load_coco_caption_gt

    gt_path = layout.caption_gt(split)
    if gt_path is None:  # Flickr30k ships no COCO-format GT: the eval annotation's captions are the references
        ids = [int(Path(item.image).stem) if Path(item.image).stem.isdigit() else i for i, item in enumerate(items)]
        return ids, {i: item.captions for i, item in zip(ids, items)}
    gt = load_coco_caption_gt(registry.local_path(dataset, gt_path) if registry.is_local else _fetch(registry, dataset, gt_path))
    ids = [coco_image_id(item.image) for item in items]
    missing = [i for i in ids if i not in gt.captions]
    if missing:
        raise ValueError(f"{dataset.ref}: {len(missing)} {split} images have no GT captions (first id {missing[0]})")
    return ids, gt.captions


def generate_captions(model_dir: str, image_urls: list[str], cfg: EvaluateConfig) -> list[str]:
    """One caption per image, in order: the images split into row ranges over the workers (or this process)."""
    options = {"num_beams": cfg.num_beams, "max_length": cfg.max_length, "min_length": cfg.min_length,
               "repetition_penalty": cfg.repetition_penalty, "batch_size": cfg.caption_batch_size}  # fmt: skip
    parts = work_parts(len(image_urls), cfg.caption_batch_size, cfg.num_workers)
    with ModelWorkers(model_dir, "caption", cfg) as workers:
        return [c for part in workers.map(caption_rows, (image_urls, options), parts,
                                          progress=("eval caption: captions", "img")) for c in part]


def evaluate_caption(model_dir: str, image_urls: list[str], image_ids: list[int], gt: dict[int, tuple[str, ...]],
                     cfg: EvaluateConfig, staging: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import time

    from pipelines.tasks.metrics import caption_scores, write_caption_results

    started = time.perf_counter()
    captions = generate_captions(model_dir, image_urls, cfg)
    generated = time.perf_counter()
    results = list(zip(image_ids, captions))
    write_caption_results(staging / f"caption_{cfg.split}_results.json", results)
    scores = caption_scores(gt, [{"image_id": i, "caption": c} for i, c in results], cfg.caption_metrics)
    details = {"num_images": len(results), "seconds_generate": round(generated - started, 3),
               "images_per_s": round(len(results) / max(generated - started, 1e-9), 3),
               "seconds_score": round(time.perf_counter() - generated, 3), "workers": cfg.num_workers,
               "examples": [{"image_id": i, "caption": c} for i, c in results[:5]]}  # fmt: skip
    return scores, details


def evaluate_nocaps(registry: Any, dataset: Any, model_dir: str, cfg: EvaluateConfig,
                    staging: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Captions for a NoCaps split, written as the official server file; no local metric (no public references)."""
    import time

    from pipelines.tasks.downstream_data import load_nocaps
    from pipelines.tasks.metrics import write_nocaps_results

    images = load_nocaps(_annotation(registry, dataset, dataset.metadata["annotations"][cfg.split]))
    images = images[: cfg.max_images] if cfg.max_images else images
    image_urls = [registry.url_of(dataset, f"images/{image.image}") for image in images]
    started = time.perf_counter()
    captions = generate_captions(model_dir, image_urls, cfg)
    seconds = time.perf_counter() - started
    results_name = f"nocaps_{cfg.split}_results.json"
    write_nocaps_results(staging / results_name, [(i.img_id, c) for i, c in zip(images, captions)], images)
    details = {"num_images": len(images), "seconds_generate": round(seconds, 3),
               "images_per_s": round(len(images) / max(seconds, 1e-9), 3), "workers": cfg.num_workers,
               "results_file": results_name,
               "examples": [{"image_id": i.img_id, "caption": c} for i, c in zip(images[:5], captions)]}  # fmt: skip
    note = f"NoCaps is scored by the official server (EvalAI); submit {results_name}"
    return {}, details, {"NoCaps": note}


# ---------------------------------------------------------------------------------------------- the stage


def _fetch(registry: Any, manifest: Any, relpath: str) -> Path:
    return registry.fetch(manifest, relpath, registry.work_dir(f"fetch-{manifest.id[:24]}") / relpath)


def run_evaluate(cfg: EvaluateConfig, *, model: Any, dataset: Any, name: str, registry: Any = None,
                 out: str | Path | None = None) -> Any:
    """Evaluate a model version on a dataset version; publish and return the evaluation version `name`."""
    from blip_models.checkpoints import is_pretrained_dir
    from datasets_manifests.manifest import Producer, cache_key
    from datasets_manifests.registry import Registry, check_name, now_utc
    from pipelines.tasks.finetune import resolve_model_source
    from pipelines.tasks.publish_model import converted_directory

    check_name(name)
    registry = registry if registry is not None else Registry()
    dataset = registry.resolve(dataset, kind="dataset")
    model_manifest, model_dir = resolve_model_source(registry, model)
    checkpoint = None  # an official .pth or a transformers directory evaluated: its source and sha256
    if not is_pretrained_dir(model_dir):
        model_dir, checkpoint = converted_directory(model_dir, MODEL_KIND[cfg.task])
    stage = f"evaluate-{cfg.task}"
    parents = [m for m in (model_manifest, dataset) if m is not None]
    outside = [] if model_manifest else [f"sha256:{checkpoint['sha256']}" if checkpoint else str(model_dir)]
    key = cache_key(stage, [p.id for p in parents] + outside, config_hash(cfg))
    cached = registry.find_cached("evaluation", name, key)
    if cached is not None:  # reused: the same table and --out file as a fresh run
        print(render_table(cached))
        _write_out(out, cached.metadata)
        return cached
    started = now_utc()
    wanted = {"vqa": "vqa", "nlvr": "nlvr", "video": "msrvtt"}.get(cfg.task, "karpathy")
    accepted = (wanted, "nocaps") if cfg.task == "caption" else (wanted,)
    if dataset.metadata.get("format") not in accepted:
        raise ValueError(f"{dataset.ref} is a {dataset.metadata.get('format') or 'non-downstream'} dataset; "
                         f"'{cfg.task}' evaluation needs a {' or '.join(accepted)} set "
                         "(pipelines.tasks.downstream)")  # fmt: skip
    staging = registry.work_dir(key) / "publish"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    notes: dict[str, str] = {}
    benchmark = dataset.metadata.get("benchmark")
    from pipelines.tasks.evaluate_tasks import evaluate_nlvr, evaluate_video, evaluate_vqa

    if cfg.task == "vqa":
        metrics, details, notes = evaluate_vqa(registry, dataset, model_dir, cfg, staging)
    elif cfg.task == "nlvr":
        metrics, details = evaluate_nlvr(registry, dataset, model_dir, cfg)
    elif cfg.task == "video":
        metrics, details = evaluate_video(registry, dataset, model_dir, cfg)
    elif benchmark == "nocaps":
        metrics, details, notes = evaluate_nocaps(registry, dataset, model_dir, cfg, staging)
    else:
        metrics, details, notes = evaluate_karpathy(registry, dataset, model_dir, cfg, staging)
    metadata = {"task": cfg.task, "split": cfg.split, "benchmark": benchmark,
                "metrics": {k: (None if v is None else float(v)) for k, v in metrics.items()},
                "details": details, "notes": notes,
                "lineage": evaluation_lineage(model_manifest, model_dir, dataset, checkpoint)}  # fmt: skip
    (staging / "metrics.json").write_text(json.dumps(metadata, indent=2, sort_keys=True))
    files = [{"path": p.name, "role": "metrics" if p.name == "metrics.json" else "other"} for p in sorted(staging.iterdir())]
    producer = Producer(stage=stage, config=to_dict(cfg), config_hash=config_hash(cfg), cache_key=key, started_at=started)
    manifest = registry.publish(kind="evaluation", name=name, staging_dir=staging, files=files, producer=producer,
                                parents=parents, metadata=metadata,
                                counts={"images": int(details["num_images"])})  # fmt: skip
    print(render_table(manifest))
    _write_out(out, metadata)
    return manifest


def evaluation_lineage(model_manifest: Any, model_dir: str, dataset: Any,
                       checkpoint: dict[str, str] | None = None) -> dict[str, Any]:  # fmt: skip
    """What was evaluated, for metrics.json and --out: the model and dataset refs and content ids; a model given
    as a directory has no ref, so its path and the sha256 of its files stand in; a converted checkpoint (an official
    .pth, a transformers directory) is also named as given with the sha256 of its weights."""
    if model_manifest is not None:
        model = {"ref": model_manifest.ref, "id": model_manifest.id}
    else:
        model = {"ref": None, "id": f"sha256:{model_content_id(model_dir)}",
                 "directory": str(Path(model_dir).resolve())}
        if checkpoint:
            model["checkpoint"] = checkpoint
    return {"model": model, "dataset": {"ref": dataset.ref, "id": dataset.id}}


def evaluate_karpathy(registry: Any, dataset: Any, model_dir: str, cfg: EvaluateConfig,
                      staging: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """Retrieval or captioning on a Karpathy-format set."""
    from pipelines.tasks.downstream import layout_of
    from pipelines.tasks.downstream_data import build_retrieval_eval, load_caption_eval

    layout = layout_of(dataset)
    items = load_caption_eval(_annotation(registry, dataset, layout.annotation(cfg.split)))
    items = items[: cfg.max_images] if cfg.max_images else items
    image_urls = [registry.url_of(dataset, f"images/{item.image}") for item in items]
    notes: dict[str, str] = {}
    if cfg.task == "retrieval":
        k_test = cfg.k_test or K_TEST[layout.benchmark]
        metrics, details = evaluate_retrieval(model_dir, image_urls, build_retrieval_eval(items), k_test, cfg)
    else:
        image_ids, gt = caption_gt(registry, dataset, layout, cfg.split, items)
        scores, details = evaluate_caption(model_dir, image_urls, image_ids, gt, cfg, staging)
        if "SPICE_unavailable" in scores:
            notes["SPICE"] = scores.pop("SPICE_unavailable")
        scores.pop("num_images", None)
        metrics = scores
    return metrics, details, notes


def _annotation(registry: Any, dataset: Any, relpath: str) -> Path:
    return registry.local_path(dataset, relpath) if registry.is_local else _fetch(registry, dataset, relpath)


def _write_out(out: str | Path | None, metadata: dict[str, Any]) -> None:
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(metadata, indent=2, sort_keys=True))


def render_table(manifest: Any) -> str:
    """The metrics of an evaluation version as a small text table."""
    meta = manifest.metadata
    lines = [f"{manifest.ref}: {meta['task']} on {meta.get('benchmark')} {meta.get('split')} "
             f"(parents {', '.join(manifest.parents)})"]  # fmt: skip
    width = max((len(k) for k in meta["metrics"]), default=8)
    for key, value in meta["metrics"].items():
        shown = "n/a" if value is None else f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
        lines.append(f"  {key:<{width}}  {shown}" + (f"   ({meta['notes'][key]})" if key in meta.get("notes", {}) else ""))
    if not meta["metrics"]:  # nothing scored here (NoCaps): say where the score comes from
        lines += [f"  {note}" for note in meta.get("notes", {}).values()]
    return "\n".join(lines)
