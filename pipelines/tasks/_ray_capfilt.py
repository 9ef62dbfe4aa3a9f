"""Ray Data adapter of the CapFilt stage: CPU decode tasks feeding captioner/filter actor pools.

The only module of the stage importing `ray.data` (shared/docs/style.md rule 3). The shape follows Ray's batch
inference recipe (shared/docs/pipeline_anchors.md §2.9): a plain function for CPU work, callable classes for
models (`__init__` loads once per actor, `__call__` infers), `compute=ActorPoolStrategy(size=...)` and fractional
`num_cpus` so a 2-CPU machine does not deadlock (shared/docs/orchestration.md §4.4).

Decode tasks are input shards, each read once front to back; their rows are model batches, not samples: one
row = a fixed slice `[start, start + batch_size)` of one input shard, holding the resized uint8 pixels of that
slice (normalised on the device, 4x less object-store traffic than float32). A batch therefore never mixes
shards and has the same composition in every run, which is what keeps resumed output byte-identical. Each
actor measures its own time computing and time waiting for input, so the stage can report whether the
accelerator was starved by JPEG decoding.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from pipelines.tasks import capfilt, capfilt_models, webdata


def decode_shard(batch: dict[str, np.ndarray], image_size: int, batch_size: int,
                 cache: tuple[str, int] | None = None) -> Iterator[dict[str, list[Any]]]:  # fmt: skip
    """Read one input shard front to back; decode + resize its JPEGs; yield one row per model batch as it fills.

    One sequential read per shard: a decode task that started mid-shard would have to walk the tar from byte 0
    to its first sample (on an object store, downloading everything before it). The rows stream out (a Ray
    Data generator task), so the actors start on a shard's first batch while the rest is being decoded. With a
    `cache` (`compute.shard_cache_dir`) a remote shard is downloaded into the node's cache first, and each row
    names this node, where the shard's writer task then reads the cached copy."""
    item = {name: batch[name][0] for name in batch}
    expected, path, size = int(item["expected"]), str(item["path"]), int(item.get("bytes", -1))
    node = _node_id()
    chunk: list[tuple[str, dict[str, bytes]]] = []
    start, began = 0, time.perf_counter()

    def row() -> dict[str, list[Any]]:
        decoded = decoded_batch(int(item["shard_index"]), start, chunk, image_size, time.perf_counter() - began)
        decoded["node"] = [node]
        return decoded

    with capfilt.open_input_shard(str(item["url"]), None if size < 0 else size, cache) as handle:
        for ordinal, key, members in webdata.iter_tar_samples(handle):
            if ordinal >= expected:
                raise ValueError(f"{path}: more samples than the {expected} its manifest lists")
            chunk.append((key, members))
            if len(chunk) == batch_size:
                yield row()
                start, chunk, began = start + len(chunk), [], time.perf_counter()
    if chunk:
        yield row()
        start += len(chunk)
    if start != expected:
        raise ValueError(f"{path}: {expected} samples expected (its manifest), found {start}")


def decoded_batch(shard_index: int, start: int, chunk: list[tuple[str, dict[str, bytes]]], image_size: int,
                  read_s: float) -> dict[str, list[Any]]:  # fmt: skip
    """One model batch (samples `start`.. of a shard) as a one-row batch: keys, web texts, decode errors, pixels."""
    from PIL import Image

    began = time.perf_counter()
    keys, web_texts, errors, arrays = [], [], [], []
    for key, members in chunk:
        keys.append(key)
        web_texts.append(members["txt"].decode("utf-8", "replace") if "txt" in members else None)
        try:
            if "jpg" not in members:
                raise ValueError("no .jpg member")
            with Image.open(io.BytesIO(members["jpg"])) as image:
                # Resize((s, s), bicubic) of blip_models.processing.eval_transform, done in PIL on uint8.
                rgb = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
            arrays.append(np.asarray(rgb, dtype=np.uint8))
            errors.append(None)
        except Exception as error:  # noqa: BLE001 - any undecodable image is a per-sample drop, with reason
            errors.append(decode_error_detail(error))
    pixels = np.stack(arrays) if arrays else np.zeros((0, image_size, image_size, 3), np.uint8)  # (n, S, S, 3)
    return {"shard_index": [shard_index], "start": [start],
            "meta": [json.dumps({"keys": keys, "web_texts": web_texts, "errors": errors})],
            "pixels": [pixels.tobytes()], "decode_s": [read_s + time.perf_counter() - began]}  # fmt: skip


def _node_id() -> str:
    """The Ray node this process runs on ('' outside Ray: unit tests)."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


def decode_error_detail(error: Exception) -> str:
    """'decode_error: <type>: <message>', with memory addresses masked so that index.parquet is reproducible.

    PIL's UnidentifiedImageError names the stream object: "cannot identify image file <_io.BytesIO object at
    0x7f...>", an address that changes from run to run.
    """
    message = re.sub(r"0x[0-9a-fA-F]+", "0x..", str(error))
    return f"decode_error: {type(error).__name__}: {' '.join(message.split())[:120]}"


def _tokenizer() -> Any:
    # BlipCaption's constructor already built the (slow to build, ~2-6 s) tokenizer in this process: reuse it.
    try:
        from blip_models.modeling_caption import _default_tokenizer

        return _default_tokenizer()
    except ImportError:
        from blip_models.tokenizer import load_tokenizer

        return load_tokenizer()


class _ModelActor:
    """Shared actor plumbing: device placement, model loading, busy/idle clocks."""

    def __init__(self, config: dict[str, Any], models: dict[str, dict[str, str]], roles: tuple[str, ...]) -> None:
        import torch

        from pipelines.config import build

        self.config = build(capfilt.CapFiltConfig, config)
        compute = self.config.compute
        # The resolved device, not torch.cuda.is_available(): the cache key records this one (capfilt.cache_relevant).
        self.device = torch.device(compute.resolved_device())
        if self.device.type == "cpu":
            torch.set_num_threads(compute.torch_threads)
        cache = capfilt.cache_setting(compute)  # remote model files: one download a node
        self.models = {role: capfilt_models.load_model(models[role], self.device, compute.dtype, cache)
                       for role in roles}  # fmt: skip
        if compute.fp8_vision:
            from blip_models.float8 import quantize_vision_linears

            for model in self.models.values():
                quantize_vision_linears(model)
        if compute.compile_vision:  # the decoder's growing cache would recompile every step: ViT blocks only
            from blip_models.compilation import compile_blocks

            for model in self.models.values():
                compile_blocks(model, vision_only=True)
        self.refs = {role: models[role]["ref"] for role in models}
        self.tokenizer = _tokenizer()
        self.last_end = time.perf_counter()
        self.calls = 0

    def _pixels(self, row: dict[str, Any], count: int) -> Any:
        size = self.config_image_size
        array = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(count, size, size, 3)
        return capfilt_models.normalize_pixels(array, self.device, self.config.compute.dtype)  # (n, 3, S, S)

    def _timed(self, batch: dict[str, np.ndarray], work: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, list[Any]]:
        began = time.perf_counter()
        wait = began - self.last_end
        rows: dict[str, list[Any]] = {}
        for index in range(len(batch["start"])):
            row = work({name: batch[name][index] for name in batch})
            for name, value in row.items():
                rows.setdefault(name, []).append(value)
        capfilt_models.synchronize(self.device)
        self.last_end = time.perf_counter()
        compute_s = self.last_end - began
        # The wait before an actor's first batch is pipeline start-up, not starvation: reported apart.
        first = self.calls == 0
        self.calls += 1
        count = len(rows["start"])
        rows["compute_s"] = [compute_s / count] * count
        rows["wait_s"] = [0.0 if first else wait / count] * count
        rows["startup_wait_s"] = [wait / count if first else 0.0] * count
        return rows


class CapFiltActor(_ModelActor):
    """Captioner and filter on one device: the normalised pixels are shared by both models."""

    def __init__(self, config: dict[str, Any], models: dict[str, dict[str, str]], image_size: int) -> None:
        super().__init__(config, models, ("captioner", "filter"))
        self.config_image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        return self._timed(batch, self._one)

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(row["meta"])
        valid = [i for i, error in enumerate(meta["errors"]) if error is None]
        pixel_values = self._pixels(row, len(valid))
        captions = capfilt_models.caption_images(self.models["captioner"], self.tokenizer, pixel_values,
                                          [meta["keys"][i] for i in valid], self.config.captioner)  # fmt: skip
        scores = capfilt_models.score_texts(self.models["filter"], self.tokenizer, pixel_values,
                                     [meta["web_texts"][i] for i in valid], captions, self.config.filter)  # fmt: skip
        return _result_row(row, meta, valid, captions, scores, self.config.captioner)


class CaptionActor(_ModelActor):
    """Captioner alone (separate pools): passes the pixels on to the filter pool."""

    def __init__(self, config: dict[str, Any], models: dict[str, dict[str, str]], image_size: int) -> None:
        super().__init__(config, models, ("captioner",))
        self.config_image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        return self._timed(batch, self._one)

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(row["meta"])
        valid = [i for i, error in enumerate(meta["errors"]) if error is None]
        captions = capfilt_models.caption_images(self.models["captioner"], self.tokenizer, self._pixels(row, len(valid)),
                                          [meta["keys"][i] for i in valid], self.config.captioner)  # fmt: skip
        meta["captions"] = captions
        return {"shard_index": row["shard_index"], "start": row["start"], "meta": json.dumps(meta),
                "pixels": row["pixels"], "decode_s": row["decode_s"], "node": row["node"]}  # fmt: skip


class FilterActor(_ModelActor):
    """Filter alone (separate pools): scores web text + the captions the caption pool attached."""

    def __init__(self, config: dict[str, Any], models: dict[str, dict[str, str]], image_size: int) -> None:
        super().__init__(config, models, ("filter",))
        self.config_image_size = image_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        caption_clock = {name: batch[name] for name in ("compute_s", "wait_s", "startup_wait_s")}
        rows = self._timed(batch, self._one)
        for name, values in caption_clock.items():  # keep the caption pool's clocks beside the filter's
            rows[f"caption_{name}"] = [float(v) for v in values]
        return rows

    def _one(self, row: dict[str, Any]) -> dict[str, Any]:
        meta = json.loads(row["meta"])
        valid = [i for i, error in enumerate(meta["errors"]) if error is None]
        scores = capfilt_models.score_texts(self.models["filter"], self.tokenizer, self._pixels(row, len(valid)),
                                     [meta["web_texts"][i] for i in valid], meta["captions"], self.config.filter)  # fmt: skip
        return _result_row(row, meta, valid, meta["captions"], scores, self.config.captioner)


def _result_row(row: dict[str, Any], meta: dict[str, Any], valid: list[int], captions: list[list[str]],
                scores: list[list[float]], captioner: capfilt.CaptionerConfig) -> dict[str, Any]:  # fmt: skip
    """One output row per model batch: per-sample captions, seeds and scores (pixels are left behind)."""
    results = []
    by_position = dict(zip(valid, range(len(valid))))
    for position, key in enumerate(meta["keys"]):
        slot = by_position.get(position)
        results.append({
            "key": key, "web_text": meta["web_texts"][position], "error": meta["errors"][position],
            "synthetic": captions[slot] if slot is not None else [],
            "scores": scores[slot] if slot is not None else None,
            "seeds": captioner.caption_seeds(key)[: len(captions[slot])] if slot is not None else [],
        })  # fmt: skip
    return {"shard_index": int(row["shard_index"]), "start": int(row["start"]), "results": json.dumps(results),
            "decode_s": float(row["decode_s"]), "node": str(row["node"])}  # fmt: skip


class ShardWriters:
    """`capfilt.finish_shard` as Ray tasks: a finished shard's outputs are written by a worker, not the driver.

    At 129M images the outputs are terabytes: written by the driver, every byte would be read and written again
    through one process on one node. Here each shard is one task with `compute.writer_cpus`, scheduled where
    Ray has CPUs, writing under `work` (a path or URL every node reaches). Ray retries a task whose worker
    died; `finish_shard` is idempotent. With the shard cache on, a task goes to the node that decoded its shard
    (soft affinity: another node if that one left the cluster), where the shard is on local disk.
    """

    def __init__(self, config: capfilt.CapFiltConfig, work: str, refs: dict[str, str],
                 carried: list[Any] | None = None) -> None:  # fmt: skip
        from pipelines.runtime import ensure_ray

        self.ray = ensure_ray()
        self.write = self.ray.remote(capfilt.finish_shard)
        self.options: dict[str, Any] = {"num_cpus": config.compute.writer_cpus, "max_retries": 3}
        self.cached = capfilt.cache_setting(config.compute) is not None
        self.args = (config, refs, carried or [])
        self.work = work
        self.pending: list[Any] = []
        self.markers: list[dict[str, Any]] = []
        self.placed = 0  # writer tasks sent to the node that decoded their shard (where its cached copy is)

    def submit(self, shard: capfilt.ShardPlan, results: list[dict[str, Any]], node: str | None = None) -> None:
        options = self.options
        if self.cached and node:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            options = {**options, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=True)}
            self.placed += 1
        self.pending.append(self.write.options(**options).remote(self.work, shard, results, *self.args))
        self._collect(timeout=0)  # a failed write stops the run now, not after the whole pipeline

    def finish(self) -> list[dict[str, Any]]:
        """Wait for every write; the markers of all shards written, in completion order."""
        self._collect(timeout=None)
        return self.markers

    def _collect(self, timeout: float | None) -> None:
        if not self.pending:
            return
        ready, self.pending = self.ray.wait(self.pending, num_returns=len(self.pending), timeout=timeout)
        failed = None
        for ref in ready:  # each fetched, errors too: Ray prints one never fetched as an "Unhandled error"
            try:
                self.markers.append(self.ray.get(ref))
            except self.ray.exceptions.RayError as error:  # the task's own error, or its worker or node died
                failed = failed or error
        if failed is None:
            return
        self.settle()
        if isinstance(getattr(failed, "cause", None), capfilt.CapFiltError):  # names the shard: a one-line error
            raise failed.cause from None
        raise failed

    def settle(self) -> None:
        """After a failure (a write's, or the pipeline's): the writes in flight finish (their shards are kept for
        the rerun), each result fetched, errors too (a full disk fails them all: Ray printed each after the
        command's own line). A retry in the same process on the same cluster (the flow retries a crashed worker)
        would otherwise write a shard beside a write of it still running: two writers of one temporary file."""
        for ref in self.pending:
            with contextlib.suppress(Exception):
                self.ray.get(ref)
        self.pending = []


def run_pipeline(config: capfilt.CapFiltConfig, items: list[dict[str, Any]], models: dict[str, dict[str, str]],
                 image_size: int) -> Iterator[dict[str, Any]]:  # fmt: skip
    """Stream the decode -> caption -> filter pipeline over `items` (one per shard); yields one dict per model batch."""
    from pipelines.config import to_dict
    from pipelines.runtime import check_gpus_available, ensure_ray

    ray = ensure_ray()
    check_gpus_available(ray, config.compute.num_gpus_per_actor, "compute.num_gpus_per_actor")
    opened = sorted({str(item["url"]) for item in items} | {m["dir"] for m in models.values() if m.get("dir")})
    capfilt.check_storage_reachable(ray.nodes(), opened,
                                    shared_filesystem=os.environ.get(capfilt.SHARED_FILESYSTEM_ENV) == "1")  # fmt: skip
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = config.compute.progress_bars
    if not config.compute.progress_bars:  # the stage shows its own; Ray Data would log how to turn its bars on
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    compute = config.compute
    raw = to_dict(config)
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    dataset = dataset.map_batches(decode_shard, batch_size=1, batch_format="numpy", num_cpus=compute.decode_cpus,
                                  fn_kwargs={"image_size": image_size, "batch_size": compute.batch_size,
                                             "cache": capfilt.cache_setting(compute)})  # fmt: skip
    actor_args = {"batch_size": 1, "batch_format": "numpy", "num_cpus": compute.num_cpus_per_actor,
                  "num_gpus": compute.num_gpus_per_actor or None,
                  "fn_constructor_kwargs": {"config": raw, "models": models, "image_size": image_size}}  # fmt: skip
    if compute.colocate:
        dataset = dataset.map_batches(CapFiltActor, compute=ray.data.ActorPoolStrategy(size=compute.num_actors),
                                      **actor_args)  # fmt: skip
    else:
        dataset = dataset.map_batches(CaptionActor, compute=ray.data.ActorPoolStrategy(size=compute.num_actors),
                                      **actor_args)  # fmt: skip
        dataset = dataset.map_batches(FilterActor, compute=ray.data.ActorPoolStrategy(size=compute.filter_actors),
                                      **actor_args)  # fmt: skip
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        for index in range(len(batch["start"])):
            yield {name: _plain(batch[name][index]) for name in batch}


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
