"""Any BLIP checkpoint as a model version: BLIP's released files and LAVIS's (by path, URL or name), a
transformers `Salesforce/blip-*` directory, or a save_pretrained directory.

The stages take model versions (CapFilt's `--captioner` / `--filter`, finetuning's and pretraining's `--init`,
evaluation), so that every dataset and model they publish has its lineage down to the weights. To bootstrap with
BLIP's own captioner and filter instead of training them (`model_base_caption_capfilt_large`,
`model_base_retrieval_coco`), publish them first: the version holds our `model.safetensors` + `config.json` of
the chosen kind and records where the weights came from (source, format, sha256 of the file) and what the load
adapted. Publishing the same weights as the same kind again returns the existing version.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

STAGE = "publish-model"


def publish_model(source: str, *, name: str, registry: Any = None, kind: str | None = None,
                  image_size: int | None = None) -> Any:  # fmt: skip
    """Publish the weights at `source` as the model version `name`, as the `kind` model (default: the
    checkpoint's own kind) at `image_size` (default: the checkpoint's; position embeddings are interpolated)."""
    from blip_models.checkpoints import save_pretrained
    from blip_models.inference import detect_format, load_for
    from datasets_manifests.manifest import Producer, cache_key
    from datasets_manifests.registry import Registry, check_name, now_utc
    from pipelines.config import config_hash

    check_name(name)
    registry = registry if registry is not None else Registry()
    source_format = detect_format(source)
    digest = source_digest(source, source_format)
    settings = {"kind": kind, "image_size": image_size}
    key = cache_key(STAGE, [f"sha256:{digest}"], config_hash(settings))
    cached = registry.find_cached("model", name, key)
    if cached is not None:
        return cached
    started = now_utc()
    loaded = load_for(source, kind, image_size=image_size)
    staging = registry.work_dir(key) / "publish"
    shutil.rmtree(staging, ignore_errors=True)
    save_pretrained(loaded.model, staging, tokenizer=loaded.tokenizer_source)
    config = loaded.model.config
    metadata = {
        "kind": loaded.kind, "image_size": int(config.vision.image_size),
        "architecture": {"vision_width": config.vision.width, "vision_depth": config.vision.depth,
                         "text_layers": config.text.num_hidden_layers},
        "source": {"checkpoint": str(source), "format": source_format, "sha256": digest},
        "load": loaded.report.summary() if loaded.report else "loaded as saved",
    }  # fmt: skip
    files = [{"path": "model.safetensors", "role": "weights"}, {"path": "config.json", "role": "config"}]
    producer = Producer(stage=STAGE, config=settings, config_hash=config_hash(settings), cache_key=key,
                        started_at=started)  # fmt: skip
    manifest = registry.publish(kind="model", name=name, staging_dir=staging, files=files, producer=producer,
                                metadata=metadata)  # fmt: skip
    registry.remove_work(key)
    return manifest


def registry_version(registry: Any, source: str) -> Any | None:
    """The model version `source` names in the registry; None when `source` is a checkpoint instead (a path, URL,
    checkpoint name or directory: `publish_model` takes it). A name that is neither stays the registry's
    not-found error."""
    from datasets_manifests.registry import NotFoundError, RegistryError

    try:
        return registry.resolve(source, kind="model")
    except RegistryError as not_a_version:
        if isinstance(not_a_version, NotFoundError) and not _could_be_checkpoint(source):
            raise
    return None


def _could_be_checkpoint(source: str) -> bool:
    from blip_models.inference import detect_format

    try:
        detect_format(source)
        return True
    except FileNotFoundError:
        return False


def source_digest(source: str, source_format: str) -> str:
    """sha256 of the weights a checkpoint is read from: the `.pth` (downloaded once for a URL or a name), our
    directory's `model.safetensors`, a transformers directory's weight files (in name order)."""
    import hashlib

    from datasets_manifests.filesystems import sha256_file

    if source_format == "official":
        from blip_models.checkpoints import local_checkpoint

        return sha256_file(local_checkpoint(source))[0]
    if source_format == "pretrained":
        return sha256_file(Path(source) / "model.safetensors")[0]
    from blip_models.hf_convert import hf_directory

    directory = hf_directory(source)
    weights = sorted(path for pattern in ("*.safetensors", "*.bin") for path in directory.glob(pattern))
    if len(weights) == 1:
        return sha256_file(weights[0])[0]
    combined = hashlib.sha256()
    for path in weights:
        combined.update(f"{path.name}\0{sha256_file(path)[0]}\n".encode())
    return combined.hexdigest()
