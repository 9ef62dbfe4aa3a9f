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

import logging
import shutil
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

STAGE = "publish-model"
# What a captioner and a filter given to CapFilt as checkpoints are published as: the pair the recipe finetunes.
CAPFILT_ROLE_KINDS = {"captioner": "caption", "filter": "retrieval"}


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
    # The key holds the kind the version is of, so `--kind` left out and the checkpoint's own kind named are the
    # same version; a kind only a load can tell (a .pth by its tensors) is looked up after loading.
    kind = kind or declared_kind(source, source_format)
    loaded = None if kind else load_for(source, None, image_size=image_size)
    settings = {"kind": kind or loaded.kind, "image_size": image_size}
    key = cache_key(STAGE, [f"sha256:{digest}"], config_hash(settings))
    cached = registry.find_cached("model", name, key)
    if cached is not None:
        return cached
    started = now_utc()
    loaded = loaded or load_for(source, kind, image_size=image_size)
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


def declared_kind(source: str, source_format: str) -> str | None:
    """The kind a checkpoint says it is without loading it: a checkpoint name's, our directory's config, a hub
    name's or a transformers directory's architecture; None for a .pth by path or URL (its tensors tell)."""
    from blip_models.checkpoints import named_checkpoints, read_pretrained_config

    if named := named_checkpoints().get(str(source)):
        return named[1]
    if source_format == "pretrained":
        return str(read_pretrained_config(source)["kind"])
    if source_format == "huggingface":
        from blip_models.hf_convert import HUB_MODELS, hf_directory, hf_kind

        return HUB_MODELS.get(str(source)) or hf_kind(hf_directory(source))
    return None


def converted_directory(source: str, kind: str | None = None) -> tuple[str, dict[str, str]]:
    """A checkpoint that is not a save_pretrained directory (an official `.pth` by path, URL or name — BLIP's
    released files, LAVIS's — or a transformers directory or hub name) as a save_pretrained directory of the `kind`
    model (default: its own), which evaluation and training workers load: converted once, in the checkpoint cache
    (`converted/<file>-<kind>-<sha256 prefix>`). Returns the directory and {checkpoint: source, sha256} (and a hub
    name's revision)."""
    from blip_models.checkpoints import checkpoint_cache_dir, save_pretrained
    from blip_models.inference import detect_format, load_for

    source_format = detect_format(source)
    origin: dict[str, str] = {"checkpoint": str(source)}
    weights = source
    if source_format == "huggingface" and not Path(source).is_dir():  # a hub name: its snapshot, resolved once
        from blip_models.hf_convert import hf_directory

        weights = str(hf_directory(source))
        origin["revision"] = Path(weights).name  # huggingface_hub's snapshots/<commit>
    digest = origin["sha256"] = source_digest(weights, source_format)
    kind = kind or declared_kind(source, source_format)
    stem = Path(str(source).rstrip("/")).name.removesuffix(".pth")
    target = checkpoint_cache_dir() / "converted" / f"{stem}-{kind or 'own'}-{digest[:16]}"
    if not (target / "config.json").is_file():
        loaded = load_for(source, kind)
        log.info("%s converted for the '%s' model%s", source, loaded.kind,
                 f" ({loaded.report.summary()})" if loaded.report else "")  # fmt: skip
        # A directory left without its config.json is replaced.
        write_whole(target, lambda partial: save_pretrained(loaded.model, partial,
                                                            tokenizer=loaded.tokenizer_source))  # fmt: skip
    return str(target), origin


def write_whole(target: Path, write: Callable[[Path], Any]) -> None:
    """`write(partial)` (a file or a directory), then `partial` renamed to `target`, replacing what is there: whole
    or absent; a write that fails leaves nothing."""
    import os

    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    _remove(partial)
    try:
        write(partial)
        if target.is_dir():  # os.replace does not replace a directory that holds files
            shutil.rmtree(target)
        os.replace(partial, target)
    finally:
        _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink()


EXPORT_FORMATS = ("blip-pth", "transformers")


def export_model(source: str, out: Path, export_format: str, kind: str | None = None) -> str:
    """Write the checkpoint `source` (a model version's directory, or any checkpoint `load_for` reads) for other
    code to load: 'blip-pth', a `.pth` as salesforce/BLIP releases its models (BLIP's and LAVIS's loaders read
    it), or 'transformers', a directory `BlipFor*.from_pretrained` and `BlipProcessor.from_pretrained` read.
    `kind` picks the task model (a pretraining model exports as 'caption' or 'itm' to transformers, which has no
    pretraining class). Written whole or not at all; an existing `out` is refused. Returns the model's kind."""
    from blip_models.checkpoints import save_official
    from blip_models.hf_convert import save_hf
    from blip_models.inference import load_for
    from blip_models.tokenizer import load_tokenizer

    if export_format not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {export_format!r}")
    if out.exists():
        raise FileExistsError(f"{out} exists: remove it or choose another --out")
    loaded = load_for(source, kind)
    if export_format == "blip-pth":
        write_whole(out, lambda partial: save_official(loaded.model, partial))
    else:
        write_whole(out, lambda partial: save_hf(loaded.model, load_tokenizer(loaded.tokenizer_source), partial))
    return loaded.kind


def training_init_source(source: str) -> tuple[str, dict[str, str]]:
    """What training workers load initial weights from, and what the model version's `init` metadata records beyond
    the workers' own report: a transformers checkpoint (directory or hub name) is converted once into a
    save_pretrained directory (`converted_directory`, its own kind; the workers read our formats), recorded by the
    name it was given, its weights' sha256 (and a hub name's revision) and the converted directory; anything else
    (our directory, a .pth, a URL) is loaded as it is and recorded by the workers."""
    from blip_models.checkpoints import CheckpointError
    from blip_models.inference import detect_format

    try:
        transformers = detect_format(source) == "huggingface"
    except (CheckpointError, FileNotFoundError):  # not a checkpoint at all: the loader names the problem
        return source, {}
    if not transformers:
        return source, {}
    directory, origin = converted_directory(source)
    return directory, {"source": origin.pop("checkpoint"), **origin, "converted": directory}


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

    if source_format == "official":
        from blip_models.checkpoints import local_checkpoint

        return file_sha256(local_checkpoint(source))
    if source_format == "pretrained":
        return file_sha256(Path(source) / "model.safetensors")
    from blip_models.hf_convert import hf_directory

    directory = hf_directory(source)
    weights = sorted(path for pattern in ("*.safetensors", "*.bin") for path in directory.glob(pattern))
    if len(weights) == 1:
        return file_sha256(weights[0])
    combined = hashlib.sha256()
    for path in weights:
        combined.update(f"{path.name}\0{file_sha256(path)}\n".encode())
    return combined.hexdigest()


def file_sha256(path: str | Path) -> str:
    """sha256 of a weights file, remembered in the checkpoint cache (`sha256/`) under its path, size, mtime and
    inode: ViT-L's checkpoint is ~1 GB, and evaluating, publishing or training from it again should not read it
    all again. A file written anew (or replaced) is hashed anew; a read-only cache only means hashing each time."""
    import hashlib
    import json
    import os

    from blip_models.checkpoints import checkpoint_cache_dir
    from datasets_manifests.filesystems import sha256_file

    resolved = Path(path).resolve()
    stat = resolved.stat()
    stamp = {"path": str(resolved), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    memo = checkpoint_cache_dir() / "sha256" / f"{hashlib.sha256(str(resolved).encode()).hexdigest()[:32]}.json"
    try:
        known = json.loads(memo.read_text())
        if {field: known.get(field) for field in stamp} == stamp and len(known.get("sha256", "")) == 64:
            return str(known["sha256"])
    except (OSError, ValueError, AttributeError):  # not remembered yet, or a broken memo: hashed again
        pass
    digest = sha256_file(resolved)[0]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        partial = memo.with_name(f"{memo.name}.{os.getpid()}")
        partial.write_text(json.dumps({**stamp, "sha256": digest}))
        os.replace(partial, memo)
    except OSError:
        pass
    return digest
