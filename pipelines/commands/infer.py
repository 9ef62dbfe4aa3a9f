"""`blip infer caption | itm | vqa | features | classify | search`: run a BLIP checkpoint on images (files, folders,
http(s) URLs).

The checkpoint may be our `save_pretrained` directory, an official salesforce/BLIP `.pth` (path, URL, or a name:
BLIP's or LAVIS's, listed by `blip infer models`) or a transformers `Salesforce/blip-*` directory; the format is
detected (blip_models.inference.load_for). Images are
processed in batches with a progress bar on stderr; results go to stdout as tab-separated lines, or one JSON
object per image with --json. Wrong checkpoint kinds, unreadable images and empty texts are one-line errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipelines.cli import CommandError

if TYPE_CHECKING:
    from blip_models.inference import LoadedModel

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TASK_KIND = {"caption": "caption", "itm": "itm", "vqa": "vqa", "features": "features", "classify": "features",
             "search": "features"}
DEFAULT_TEMPLATE = "a picture of {}"  # the prompt of LAVIS's BLIP zero-shot classification example


def register(subparsers: Any) -> None:
    infer = subparsers.add_parser(
        "infer",
        help="run a BLIP checkpoint on images: caption | itm | vqa | features | classify | search (models: the named "
        "ones)",
        description="Run a checkpoint (our model directory, an official .pth by path, URL or name, or a transformers "
        "BLIP directory) on one image or every image of a folder; `blip infer models` lists the names.",
    )
    tasks = infer.add_subparsers(dest="task", metavar="TASK", required=True)
    for task, help_text in (("caption", "generate a caption per image (beam 3, max 20, min 5, 'a picture of ')"),
                            ("itm", "image-text matching: ITM probability + ITC cosine per (image, text)"),
                            ("vqa", "answer questions about each image"),
                            ("features", "image (and text / multimodal) feature vectors"),
                            ("classify", "zero-shot classification: rank labels by ITC similarity with a prompt "
                             "('a picture of {label}'), optionally re-ranked by ITM"),
                            ("search", "text-to-image search: the images of a folder ranked for each --query by ITC "
                             "similarity, optionally re-ranked by ITM")):  # fmt: skip
        parser = tasks.add_parser(task, help=help_text, description=help_text)
        _common_arguments(parser)
        if task == "caption":
            parser.add_argument("--num-beams", type=int, default=3)
            parser.add_argument("--max-length", type=int, default=20, help="tokens, prompt included")
            parser.add_argument("--min-length", type=int, default=5, help="tokens, prompt included")
            parser.add_argument("--prompt", default=None, help="caption prefix (default: the model's, 'a picture of ')")
            parser.add_argument("--sample", action="store_true", help="nucleus sampling (top-k 50, then top-p 0.9, as BLIP) instead of beams")
            parser.add_argument("--top-p", type=float, default=0.9, help="nucleus of --sample (default: %(default)s)")
            parser.add_argument("--num-captions", type=int, default=1, metavar="N",
                                help="captions per image (LAVIS's num_captions): the N best beams (N <= --num-beams), "
                                "or N samples with --sample (default: 1)")
            parser.add_argument("--seed", type=int, default=None,
                                help="seed of --sample: the same seed and --batch-size give the same captions")
        elif task == "itm":
            parser.add_argument("--text", action="append", required=True, help="text to match; repeatable")
            parser.add_argument("--gradcam", type=Path, default=None, metavar="DIR",
                                help="also write LAVIS's ITM GradCAM of each (image, text) to DIR: where in the image "
                                "the match rests, averaged over the text and per word (<image file>-t<N>.png)")
            parser.add_argument("--gradcam-block", type=int, default=None, metavar="N",
                                help="text layer whose cross-attention is read (default: LAVIS's 6; the last but one of a shallower "
                                "encoder)")
        elif task == "vqa":
            parser.add_argument("--question", action="append", required=True, help="question; repeatable")
            parser.add_argument("--answers", type=Path, default=None,
                                help="answer list (JSON list or one per line): rank these instead of generating")
        elif task == "search":
            parser.add_argument("--query", action="append", required=True, help="text to search for; repeatable")
            parser.add_argument("--top-k", type=int, default=5, help="images reported per query (default: 5)")
            parser.add_argument("--rerank", type=int, default=0, metavar="K",
                                help="score the K best images by ITC with the ITM head too and order them by it "
                                "(needs a checkpoint with an ITM head: pretrain, retrieval, ITM); default 0: off")
            parser.add_argument("--gallery-cache", type=Path, default=None, metavar="FILE",
                                help="keep the images' features in FILE and reuse them while the checkpoint, "
                                "image size and precision are the same: a large folder is encoded once for many "
                                "searches, and afterwards only its new or changed images (by name, size, mtime)")
        elif task == "classify":
            parser.add_argument("--label", action="append", default=[], help="a class name; repeatable")
            parser.add_argument("--labels", type=Path, default=None,
                                help="class names (JSON list or one per line), with or instead of --label")
            parser.add_argument("--template", default=DEFAULT_TEMPLATE,
                                help="prompt around each label, '{}' where the label goes (default: %(default)r)")
            parser.add_argument("--top-k", type=int, default=5, help="labels reported per image (default: 5)")
            parser.add_argument("--rerank", type=int, default=0, metavar="K",
                                help="score the K best labels by ITC with the ITM head too and order them by it "
                                "(needs a checkpoint with an ITM head: pretrain, retrieval, ITM); default 0: off")
            parser.add_argument("--temperature", type=float, default=None,
                                help="softmax temperature of the probabilities (default: the model config's ITC "
                                "temperature, BLIP's 0.07); the ranking does not depend on it")
        else:
            parser.add_argument("--text", default=None, help="also return text and multimodal features of this text")
            parser.add_argument("--output", type=Path, default=None, help="write the features to this .pt file")
        parser.set_defaults(func=cmd_infer)
    models = tasks.add_parser("models", help="the checkpoints --checkpoint takes by name, and which are downloaded",
                              description="Checkpoints known by name: BLIP's released files (model_base, ...), LAVIS's "
                              "model zoo as arch/model_type (blip_caption/base_coco, ...) and transformers' "
                              "Salesforce/blip-* hub names. A named .pth is downloaded once into the checkpoint cache "
                              "($BLIP_CHECKPOINT_CACHE, else torch hub's directory); the names also serve "
                              "`blip train --init`.")  # fmt: skip
    models.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    models.set_defaults(func=cmd_models)


def cmd_models(args: argparse.Namespace) -> int:
    from blip_models.checkpoints import LAVIS_MODELS, cached_path, named_checkpoints
    from blip_models.hf_convert import HUB_MODELS

    rows = []
    for name, (url, kind) in named_checkpoints().items():
        cached = cached_path(url)
        rows.append({"name": name, "kind": kind, "source": "LAVIS" if name in LAVIS_MODELS else "BLIP", "url": url,
                     "cached": str(cached) if cached.is_file() else None})  # fmt: skip
    rows += [{"name": name, "kind": kind, "source": "transformers hub", "url": f"https://huggingface.co/{name}",
              "cached": None} for name, kind in HUB_MODELS.items()]  # fmt: skip
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    width = max(len(row["name"]) for row in rows)
    for row in rows:
        state = "downloaded" if row["cached"] else ""
        print(f"{row['name']:<{width}}  {row['kind']:<9}  {row['source']:<16}  {state:<10}  {row['url']}")
    return 0


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model directory, official .pth (path/URL), a checkpoint name (`blip infer models`: "
                        "model_base_capfilt_large, blip_caption/base_coco, ...), HF directory, or a model version "
                        "of the registry (name, name@vN)")
    parser.add_argument("--registry", default=None,
                        help="registry of --checkpoint's model versions (default BLIP_REGISTRY or "
                        "./artifacts/registry)")
    parser.add_argument("--tokenizer", default=None, help="vocab.txt or tokenizer directory (default: offline BERT vocab)")
    parser.add_argument("--image", required=True, action="append", metavar="FILE_DIR_OR_URL",
                        help="an image file, a folder of images, an http(s) image URL (fetched once, as BLIP's and "
                        "LAVIS's demos load theirs) or an object store's image or prefix (s3://, gs://); repeat for "
                        "several")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON object per image on stdout")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=None, help="override the checkpoint's image size")
    parser.add_argument("--verbose", action="store_true", help="list every missing / unexpected / ignored key on load")


MAX_URL_IMAGE_BYTES = 64 << 20  # a URL answering more than this is not an image to caption


@dataclass
class InputImages:
    """The images of `--image` as local files, in the order given (a folder's sorted), each said as the user named
    it: an image URL is fetched once into `folder` and shown as its URL; `stamps` is what a search's kept feature
    of each depends on (a file: path, size, mtime; a URL: the URL, size and its bytes' digest)."""

    paths: list[Path]
    shown: dict[Path, str]
    stamps: list[tuple[str, int, int]]

    def name(self, path: Path) -> str:
        return self.shown.get(path, str(path))


def list_images(sources: list[str], folder: Path) -> InputImages:
    """Files, folders (their images, sorted), http(s) URLs and object-store URLs (an image, or a prefix's images;
    fetched into `folder`); one line naming the first that is missing, empty or cannot be fetched."""
    images = InputImages([], {}, [])
    for source in sources:
        if "://" in source and not source.startswith("file://"):
            for url in _store_images(source) if not source.startswith(("http://", "https://")) else [source]:
                path, digest = _fetch_image(url, folder, len(images.paths))
                images.paths.append(path)
                images.shown[path] = url
                images.stamps.append((url, path.stat().st_size, digest))
            continue
        source = source.removeprefix("file://")
        path = Path(source)
        if path.is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise CommandError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        else:
            raise CommandError(f"image not found: {path}")
        for file in found:
            stat = file.stat()
            images.paths.append(file)
            images.stamps.append((str(file.resolve()), stat.st_size, stat.st_mtime_ns))
    return images


def _store_images(url: str) -> list[str]:
    """An object store's image (s3://, gs://, ...: any fsspec URL) as it is, or a prefix's images, sorted."""
    from datasets_manifests.filesystems import url_to_fs

    try:
        fs, root = url_to_fs(url)
        if not fs.isdir(root):
            if not fs.exists(root):
                raise CommandError(f"image not found: {url}")
            return [url]
        listed = sorted(path for path in fs.ls(root, detail=False) if Path(path).suffix.lower() in IMAGE_SUFFIXES)
    except (OSError, ImportError, ValueError) as error:
        raise CommandError(f"cannot read {url}: {type(error).__name__}: {error}") from None
    if not listed:
        raise CommandError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {url}")
    return [f"{url.rstrip('/')}/{Path(path).name}" for path in listed]


def _fetch_image(url: str, folder: Path, number: int) -> tuple[Path, int]:
    """An image URL's bytes (http(s), or an object store's through fsspec) into `folder` (named after the URL's
    last part, so GradCAM files are too); returns the file and the first 60 bits of its sha256."""
    import hashlib
    import io
    import urllib.error
    import urllib.parse
    import urllib.request

    from PIL import Image

    kind = "no content type"
    try:
        if url.startswith(("http://", "https://")):
            request = urllib.request.Request(url, headers={"User-Agent": "blip-infer"})
            with urllib.request.urlopen(request, timeout=30) as response:
                data = response.read(MAX_URL_IMAGE_BYTES + 1)
                kind = response.headers.get("Content-Type", kind)
        else:
            from datasets_manifests.filesystems import url_to_fs  # a missing backend: its install hint

            fs, path = url_to_fs(url)
            with fs.open(path, "rb") as handle:
                data = handle.read(MAX_URL_IMAGE_BYTES + 1)
    except urllib.error.HTTPError as error:
        raise CommandError(f"cannot fetch image {url}: HTTP {error.code} {error.reason}") from None
    except (urllib.error.URLError, OSError, ImportError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise CommandError(f"cannot fetch image {url}: {reason}") from None
    if len(data) > MAX_URL_IMAGE_BYTES:
        raise CommandError(f"image {url} is larger than {MAX_URL_IMAGE_BYTES >> 20} MiB: not fetched")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001 - PIL raises many types for what is not an image
        raise CommandError(f"{url} is not an image ({kind}, {len(data)} bytes): {type(error).__name__}") from None
    name = Path(urllib.parse.urlparse(url).path).name or "image"
    path = folder / f"{number:04d}" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return path, int(hashlib.sha256(data).hexdigest()[:15], 16)


def _check_texts(values: list[str] | None, what: str) -> list[str]:
    values = values or []
    for value in values:
        if not value.strip():
            raise CommandError(f"empty {what}: every --{what} must contain some text")
    return values


def _read_list(path: Path | None, what: str) -> list[str] | None:
    """A JSON list of strings or one item per line; None without a path."""
    if path is None:
        return None
    if not path.is_file():
        raise CommandError(f"{what} list not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = [line.strip() for line in text.splitlines() if line.strip()]
    if not isinstance(items, list) or not items or not all(isinstance(a, str) and a.strip() for a in items):
        raise CommandError(f"{path}: {what} list must be a non-empty JSON list of strings or one {what} per line")
    return items


def _classify_settings(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The labels (--label, then --labels) and their prompts; CommandError naming what is wrong."""
    labels = _check_texts(args.label, "label") + (_read_list(args.labels, "label") or [])
    if not labels:
        raise CommandError("classify needs labels: --label NAME (repeatable) or --labels FILE")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CommandError(f"label {repeated[0]!r} is given more than once")
    if "{}" not in args.template:
        raise CommandError(f"--template {args.template!r} has no '{{}}' where the label goes")
    if args.top_k < 1 or args.rerank < 0:
        raise CommandError(f"--top-k must be >= 1 and --rerank >= 0, got {args.top_k} and {args.rerank}")
    if args.temperature is not None and not args.temperature > 0:
        raise CommandError(f"--temperature must be > 0, got {args.temperature}")
    return labels, [args.template.replace("{}", label) for label in labels]


def _device(name: str) -> Any:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise CommandError(f"bad --device {name!r}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError(f"--device {name}: CUDA is not available on this machine")
    return device


def describe_load(loaded: LoadedModel, checkpoint: str, verbose: bool, shown: int = 3) -> str | None:
    """The load report for stderr: the checkpoint's kind, the architecture read from it, and counts (with a few
    names; every name when `verbose`) of the keys that did not load one-to-one. None for our own directory of the
    requested kind without `verbose`: every tensor was loaded by name, there is nothing to report."""
    report = loaded.report
    if report is None and not verbose:
        return None
    vision, text = loaded.model.config.vision, loaded.model.config.text
    source_kind = report.source_kind if report is not None else loaded.kind
    head = (f"load: {checkpoint} ({loaded.source_format}, a '{source_kind}' checkpoint) as the '{loaded.kind}' model; "
            f"ViT {vision.depth} x {vision.width} (patch {vision.patch_size}, {vision.image_size} px), "
            f"text {text.num_hidden_layers} x {text.hidden_size}")  # fmt: skip
    if report is None:
        return head + "; every tensor loaded by name"
    groups = (("missing", report.missing), ("unexpected", report.unexpected),
              ("ignored momentum/queue", report.ignored_training_state), ("freshly initialised", report.initialized),
              ("adapted", report.adapted))  # fmt: skip
    parts = [f"{len(report.loaded)} tensors loaded"]
    lists = []
    for label, keys in groups:
        if not keys and label in ("freshly initialised", "adapted"):
            continue  # rare; missing/unexpected/ignored are always counted, even when 0
        names = "" if not keys or verbose else f" ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})"
        parts.append(f"{len(keys)} {label}{names}")
        if verbose and keys:
            lists.append(f"  {label}: " + ", ".join(keys))
    hint = "" if verbose or not any(len(keys) > shown for _, keys in groups) else " (--verbose lists every key)"
    return "\n".join([f"{head}; " + "; ".join(parts) + hint, *lists])


def checkpoint_source(checkpoint: str, registry_url: str | None) -> str:
    """What `load_for` reads for --checkpoint, looked for in the order of `--init` and `blip eval`: a file,
    directory or URL as given; a model version of the registry, as its local directory (fetched from a remote
    registry); a checkpoint name or a transformers hub name as given. None of these: the not-found line."""
    from blip_models.inference import detect_format
    from datasets_manifests.registry import Registry, RegistryError, default_registry_url
    from pipelines.tasks.finetune import resolve_model_source

    url = registry_url or default_registry_url()
    if not (Path(checkpoint).exists() or checkpoint.startswith(("http://", "https://"))):
        try:
            version, directory = resolve_model_source(Registry(url, create=False), checkpoint)
            if version is not None:
                return directory
        except (RegistryError, FileNotFoundError):
            pass  # not a version of the registry (or no registry there)
    try:
        detect_format(checkpoint)
    except FileNotFoundError as error:
        head, _, tail = str(error).partition("; ")
        raise CommandError(f"{head}, nor a model version of {url}; {tail}") from None
    return checkpoint


@dataclass(frozen=True)
class CheckedInputs:
    """The texts of an `infer` command line, checked before a model loads (what each task reads)."""

    texts: list[str]  # itm
    questions: list[str]  # vqa
    answers: list[str]  # vqa --answers: rank these instead of generating
    labels: list[str]  # classify
    prompts: list[str]  # classify: a prompt a label
    queries: list[str]  # search


def cmd_infer(args: argparse.Namespace) -> int:
    import tempfile

    checked = _check_inputs(args)
    with tempfile.TemporaryDirectory(prefix="blip-infer-") as fetched:  # URLs' images, for the run's length
        return _infer(args, list_images(args.image, Path(fetched)), checked)


def _check_inputs(args: argparse.Namespace) -> CheckedInputs:
    if args.batch_size < 1:
        raise CommandError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.task == "caption":
        if args.num_captions < 1:
            raise CommandError(f"--num-captions must be >= 1, got {args.num_captions}")
        if not args.sample and args.num_captions > args.num_beams:
            raise CommandError(f"--num-captions {args.num_captions} > --num-beams {args.num_beams}: beam search "
                               "returns at most one caption a beam (raise --num-beams, or --sample)")  # fmt: skip
        if not 0.0 < args.top_p <= 1.0:
            raise CommandError(f"--top-p must be in (0, 1], got {args.top_p}")
    texts = _check_texts(getattr(args, "text", None) if args.task == "itm" else None, "text")
    questions = _check_texts(getattr(args, "question", None), "question")
    if args.task == "features" and args.text is not None:
        _check_texts([args.text], "text")
    answers = _read_list(getattr(args, "answers", None), "answer")
    labels, prompts = _classify_settings(args) if args.task == "classify" else ([], [])
    queries = _check_texts(getattr(args, "query", None), "query")
    if args.task == "search" and (args.top_k < 1 or args.rerank < 0):
        raise CommandError(f"--top-k must be >= 1 and --rerank >= 0, got {args.top_k} and {args.rerank}")
    return CheckedInputs(texts=texts, questions=questions, answers=answers, labels=labels, prompts=prompts,
                         queries=queries)  # fmt: skip


def _infer(args: argparse.Namespace, inputs: InputImages, checked: CheckedInputs) -> int:
    import contextlib

    import torch
    from tqdm import tqdm

    from blip_models.checkpoints import CheckpointError
    from blip_models.inference import (CaptionSettings, caption, classify, features, image_features, itm,
                                       label_features, load_for, load_images, search, vqa)  # fmt: skip
    from blip_models.tokenizer import load_tokenizer

    images = inputs.paths
    texts, questions, answers, labels, prompts, queries = (checked.texts, checked.questions, checked.answers,
                                                           checked.labels, checked.prompts, checked.queries)
    device = _device(args.device)
    kind = "itm" if args.task in ("classify", "search") and args.rerank else TASK_KIND[args.task]
    try:
        source = checkpoint_source(args.checkpoint, args.registry)
        loaded = load_for(source, kind, image_size=args.image_size)
        tokenizer = load_tokenizer(args.tokenizer or loaded.tokenizer_source)
    except CheckpointError as error:
        raise CommandError(f"checkpoint {args.checkpoint} cannot serve `infer {args.task}`: {error}") from error
    except ValueError as error:  # tokenizer or config problems
        raise CommandError(str(error)) from error
    report = describe_load(loaded, args.checkpoint, args.verbose)
    if report:
        print(report, file=sys.stderr)
    model = loaded.model.to(device).eval()
    image_size = int(model.config.vision.image_size)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    if args.task == "classify":
        with torch.inference_mode(), autocast:
            prompt_features = label_features(model, tokenizer, prompts)
        temperature = args.temperature or float(model.config.temp)

    if args.task == "caption":
        settings = CaptionSettings(num_beams=args.num_beams, max_length=args.max_length, min_length=args.min_length,
                                   prompt=args.prompt, do_sample=args.sample, top_p=args.top_p,
                                   num_captions=args.num_captions)  # fmt: skip
        # One generator for the whole run: each batch draws on from where the last stopped.
        generator = torch.Generator(device).manual_seed(args.seed) if args.sample and args.seed is not None else None
    collected: dict[str, list[Any]] = {}
    to_encode, kept_features = images, {}
    if args.task == "search":
        gallery_key, gallery_images = _gallery_key(source, image_size, args), inputs.stamps
        kept_features = _cached_gallery(args.gallery_cache, gallery_key, gallery_images)
        to_encode = [path for path, stamp in zip(images, gallery_images) if stamp not in kept_features]
    progress = tqdm(total=len(to_encode), desc=f"infer {args.task}", unit="img", file=sys.stderr, disable=None)
    for start in range(0, len(to_encode), args.batch_size):
        batch_paths = to_encode[start : start + args.batch_size]
        try:
            pixels = load_images(batch_paths, image_size).to(device)
        except ValueError as error:
            raise CommandError(str(error)) from error
        with torch.inference_mode(), autocast:
            if args.task == "caption":
                captions = caption(model, tokenizer, pixels, settings, generator)
                per_image = args.num_captions
                rows = [{"caption": captions[i * per_image]} if per_image == 1 else
                        {"caption": captions[i * per_image], "captions": captions[i * per_image : (i + 1) * per_image]}
                        for i in range(len(batch_paths))]  # fmt: skip
            elif args.task == "itm":
                scores = itm(model, tokenizer, pixels, texts)
                rows = [{"results": [dict(text=t, **scores[i * len(texts) + j]) for j, t in enumerate(texts)]}
                        for i in range(len(batch_paths))]  # fmt: skip
                if args.gradcam is not None:  # needs gradients: outside inference_mode
                    with torch.inference_mode(False):
                        _write_gradcams(model, tokenizer, pixels, batch_paths, texts, rows, args)
            elif args.task == "vqa":
                answers_out = vqa(model, tokenizer, pixels, questions, answer_list=answers)
                rows = [{"answers": [{"question": q, "answer": answers_out[i * len(questions) + j]}
                                     for j, q in enumerate(questions)]} for i in range(len(batch_paths))]  # fmt: skip
            elif args.task == "classify":
                ranked = classify(model, tokenizer, pixels, prompts, prompt_features, temperature, args.top_k,
                                  rerank=args.rerank)  # fmt: skip
                rows = [{"labels": [{**entry, "label": labels[int(entry["label"])]} for entry in entries]}
                        for entries in ranked]  # fmt: skip
            elif args.task == "search":  # ranked once the whole folder is encoded
                collected.setdefault("image_feature", []).append(image_features(model, pixels).cpu())
                rows = []
            else:
                feats = features(model, tokenizer, pixels, args.text)
                for name, tensor in feats.items():
                    collected.setdefault(name, []).append(tensor.float().cpu())
                rows = [{name: [round(v, 6) for v in tensor[i].float().tolist()] if args.json else list(tensor.shape[1:])
                         for name, tensor in feats.items()} for i in range(len(batch_paths))]  # fmt: skip
        for path, row in zip(batch_paths, rows):
            _emit(inputs.name(path), row, args)
        progress.update(len(batch_paths))
    progress.close()
    if args.task == "search":
        encoded = iter(torch.cat(collected["image_feature"]) if to_encode else [])
        gallery = torch.stack([kept_features[stamp] if stamp in kept_features else next(encoded)
                               for stamp in gallery_images])  # fmt: skip
        if to_encode:
            _keep_gallery(args.gallery_cache, gallery_key, gallery_images, gallery)

        def load_pixels(indices: list[int]) -> Any:
            return load_images([images[index] for index in indices], image_size).to(device)

        with torch.inference_mode(), autocast:
            ranked = search(model, tokenizer, queries, gallery, args.top_k, rerank=args.rerank, load_pixels=load_pixels)
        for query, entries in zip(queries, ranked):
            _emit_search(query, [{**entry, "image": inputs.name(images[int(entry["image"])])} for entry in entries],
                         args)  # fmt: skip
    if args.task == "features" and args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": [inputs.name(p) for p in images], **{k: torch.cat(v) for k, v in collected.items()}},
                   args.output)  # fmt: skip
        print(f"wrote features of {len(images)} image(s) to {args.output}", file=sys.stderr)
    return 0


def _write_gradcams(model: Any, tokenizer: Any, pixels: Any, paths: list[Path], texts: list[str],
                    rows: list[dict[str, Any]], args: argparse.Namespace) -> None:  # fmt: skip
    """GradCAM pictures of a batch's pairs into --gradcam, each result row told its file."""
    from PIL import Image

    from blip_models.inference import gradcam, gradcam_panels

    try:
        maps = gradcam(model, tokenizer, pixels.clone(), texts, args.gradcam_block)
    except ValueError as error:
        raise CommandError(str(error)) from error
    args.gradcam.mkdir(parents=True, exist_ok=True)
    size = int(model.config.vision.image_size)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            for j, result in enumerate(rows[i]["results"]):
                target = args.gradcam / f"{path.name}-t{j}.png"
                gradcam_panels(image, maps[i * len(texts) + j], size).save(target)
                result["gradcam"] = str(target)


def _gallery_key(source: str, image_size: int, args: argparse.Namespace) -> dict[str, Any]:
    """What every image feature of a search depends on: the weights (their source, and its mtime when a local
    path), the image size and the precision."""
    checkpoint = Path(source)
    if checkpoint.is_dir():  # a directory's weights, rewritten in place by a save into it
        checkpoint = next((checkpoint / name for name in ("model.safetensors", "pytorch_model.bin")
                           if (checkpoint / name).is_file()), checkpoint)  # fmt: skip
    return {"checkpoint": source,
            "checkpoint_mtime_ns": checkpoint.stat().st_mtime_ns if checkpoint.exists() else None,
            "image_size": image_size, "precision": args.precision}  # fmt: skip


def _cached_gallery(cache: Path | None, key: dict[str, Any],
                    stamps: list[tuple[str, int, int]]) -> dict[tuple[str, int, int], Any]:  # fmt: skip
    """The features kept in `cache` for the images of `stamps` still as they were, when the cache was made with
    the same weights (`key`); the others are encoded (a folder that gained or changed a few images encodes those
    few)."""
    import torch

    if cache is None or not cache.is_file():
        return {}
    try:
        kept = torch.load(cache, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a broken or foreign file: said, then computed again
        print(f"--gallery-cache {cache}: unreadable ({type(error).__name__}), encoding the images again",
              file=sys.stderr)
        return {}
    if not (isinstance(kept, dict) and "images" in kept and "image_feature" in kept):
        print(f"--gallery-cache {cache}: not a gallery cache of this version of blip infer, encoding the images "
              "again", file=sys.stderr)  # fmt: skip
        return {}
    features = dict(zip(map(tuple, kept["images"]), kept["image_feature"]))
    if kept.get("key") != key:
        print(f"--gallery-cache {cache}: made with other weights, image size or precision, encoding the images "
              "again", file=sys.stderr)  # fmt: skip
        return {}
    reused = {stamp: features[stamp] for stamp in stamps if stamp in features}
    encoded = f", {len(stamps) - len(reused)} new or changed encoded" if len(reused) < len(stamps) else ""
    print(f"--gallery-cache {cache}: {len(reused)} image features reused{encoded}", file=sys.stderr)
    return reused


def _keep_gallery(cache: Path | None, key: dict[str, Any], stamps: list[tuple[str, int, int]], gallery: Any) -> None:
    """The folder's features as they are now (images gone from it are left out)."""
    import torch

    if cache is None:
        return
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_name(f"{cache.name}.partial")
    torch.save({"key": key, "images": [list(stamp) for stamp in stamps], "image_feature": gallery}, partial)
    partial.replace(cache)  # whole or absent


def _emit_search(query: str, entries: list[dict[str, Any]], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"query": query, "results": entries}), flush=True)
        return
    for rank, entry in enumerate(entries, 1):
        itm = f"\titm={entry['itm_probability']:.4f}" if "itm_probability" in entry else ""
        print(f"{query}\t{rank}\t{entry['image']}\titc={entry['itc_cosine']:.4f}{itm}")


def _emit(path: str, row: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({"image": str(path), **row}), flush=True)
        return
    if "captions" in row:
        for text in row["captions"]:
            print(f"{path}\t{text}")
    elif "caption" in row:
        print(f"{path}\t{row['caption']}")
    elif "results" in row:
        for result in row["results"]:
            print(f"{path}\t{result['text']}\titm={result['itm_probability']:.4f}\titc={result['itc_cosine']:.4f}")
    elif "labels" in row:
        for item in row["labels"]:
            itm = f"\titm={item['itm_probability']:.4f}" if "itm_probability" in item else ""
            print(f"{path}\t{item['label']}\tp={item['probability']:.4f}\titc={item['itc_cosine']:.4f}{itm}")
    elif "answers" in row:
        for item in row["answers"]:
            print(f"{path}\t{item['question']}\t{item['answer']}")
    else:
        print(f"{path}\t" + "\t".join(f"{name}={shape}" for name, shape in row.items()))
