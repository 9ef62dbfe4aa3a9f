"""`blip data ...`: look at the registry from the command line.

    blip data [--registry URL] ls | show REF | lineage REF | diff REF_A REF_B | verify REF | work [--remove KEY]
                               | rm REF... [--data-only] [--dry-run] [--yes] | find --url URL | --key KEY | --sha256 HEX
                               | tag REF TAG | untag NAME@TAG
                               | takedown [REF...] --url URL | --urls FILE | --key KEY | --sha256 HEX [--free-old]
                               | samples REF [--n N --where COL=VAL --text STR] | catalog [NAME] | serve
                               | publish-downstream BENCHMARK --annotations DIR --images DIR --name NAME
                               | publish-model SOURCE --name NAME [--kind KIND]

The registry is `--registry`, else $BLIP_REGISTRY, else ./artifacts/registry (any fsspec URL). Module
imports stay light (argparse, fsspec via the registry): pyarrow is imported by the handlers that need it,
the web browser only by `serve`, so `blip data ls` starts fast. Errors are one line (RegistryError /
UserError are printed by `pipelines.cli.main` without a traceback).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

from datasets_manifests.browser import DEFAULT_PORT
from datasets_manifests.browser.jobs import WAIT_S
from datasets_manifests.manifest import KINDS, Manifest
from datasets_manifests.registry import TAKEDOWN_STAGE, Registry, default_registry_url


class UserError(Exception):
    """A bad command line (printed as one line by `blip`)."""


def _seconds(text: str) -> float:
    """A non-negative number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be a finite number >= 0, got {text!r}")
    return value


def register(subparsers: Any) -> None:
    data = subparsers.add_parser(
        "data", help="inspect dataset/model versions: ls, show, lineage, diff, verify, samples, find, takedown, "
        "export, work, rm, tag, untag, catalog, serve, publish-downstream, publish-model, export-model",
        description="Inspect the versioned registry (datasets, models, evaluations) and the catalog of public "
        "sources. --registry (or $BLIP_REGISTRY) picks the registry; default ./artifacts/registry.",
    )
    data.add_argument("--registry", default=None, help="registry URL (local dir, s3://, gs://, memory://)")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    def command(name: str, help_text: str, func: Any, json_option: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the sub-command; SUPPRESS keeps `blip data --registry X ls` working.
        parser.add_argument("--registry", default=argparse.SUPPRESS, help="registry URL (overrides the one above)")
        if json_option:
            parser.add_argument("--json", action="store_true", help="print JSON instead of text")
        parser.set_defaults(func=func)
        return parser

    ls = command("ls", "list published versions", cmd_ls)
    ls.add_argument("--kind", choices=KINDS, default=None, help="only this kind")
    ls.add_argument("name", nargs="?", help="only versions of this name")

    show = command("show", "counts, stats, drop reasons and lineage of a version", cmd_show)
    show.add_argument("ref", help="name@version, name@latest, name or name@<id prefix>")

    lineage = command("lineage", "parents up to the sources and children down to the leaves", cmd_lineage)
    lineage.add_argument("ref")

    diff = command("diff", "samples added / removed / re-captioned / dropped between two versions", cmd_diff)
    diff.add_argument("ref_a")
    diff.add_argument("ref_b")
    diff.add_argument("--n", type=int, default=10, help="examples per list (default 10)")

    verify = command("verify", "recompute sha256 and size of every file of a version", cmd_verify)
    verify.add_argument("ref")
    verify.add_argument("--workers", type=int, default=None,
                        help="files hashed at once (default: one per core; 16 on object storage)")

    samples = command("samples", "print samples of a version's per-sample index", cmd_samples)
    samples.add_argument("ref")
    samples.add_argument("--n", type=int, default=10, help="how many samples (default 10)")
    samples.add_argument("--offset", type=int, default=0, help="skip this many matching samples")
    samples.add_argument("--where", action="append", default=[], metavar="COL=VAL",
                         help="keep samples whose COL equals VAL (repeat; same COL twice means either; "
                         "VAL 'null' means missing), e.g. --where status=dropped; or compares: COL>=VAL (>, <=, <; "
                         "repeats all hold; quoted in a shell), e.g. --where 'similarity>=0.28' --where 'similarity<0.35'")
    samples.add_argument("--text", default=None, help="case-insensitive substring of caption, raw_caption or url")
    samples.add_argument("--columns", default=None, help="comma-separated columns to print")

    export = command("export", "a dataset version's kept texts as BLIP's released files ([{url, caption}], as "
                     "ccs_filtered.json / ccs_synthetic_filtered.json) or JSON lines", cmd_export)  # fmt: skip
    export.add_argument("ref", help="dataset version (a CapFilt version exports its kept web and synthetic texts)")
    export.add_argument("--out", required=True, help="the file to write")
    export.add_argument("--format", dest="export_format", choices=("blip-json", "jsonl"), default="blip-json",
                        help="blip-json: a JSON list of {url, caption}, as Salesforce released the bootstrapped "
                        "data (default); jsonl: one {key, url, caption, source, itm_score} a line")  # fmt: skip
    export.add_argument("--source", choices=("all", "web", "synthetic"), default="all",
                        help="which kept texts: all (BLIP's union, default), web (as ccs_filtered.json) or "
                        "synthetic (as ccs_synthetic_filtered.json)")  # fmt: skip
    export.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help="also write the version's images out of its shards into DIR/<shard>/<key>.jpg and name "
                        "them in the entries ({image, caption}: the annotation format salesforce/BLIP's pretrain.py "
                        "reads) instead of the URLs; resumable per shard")  # fmt: skip

    work = command("work", "what stage runs left in the work dirs (and a remote registry's store): unfinished "
                   "runs, leftovers, training checkpoints; remove them", cmd_work)  # fmt: skip
    work.add_argument("--remove", action="append", default=[], metavar="KEY",
                      help="remove this work (a key from the listing, e.g. train-runs/NAME); repeatable. An "
                      "unfinished run's work is what its rerun goes on from: the rerun then starts over; a run going "
                      "on (state running: its process holds the run's lock, or its note in the store beats) is refused")
    work.add_argument("--remove-leftovers", action="store_true",
                      help="remove what no rerun needs: the work of published runs, caches (local copies of remote "
                      "files, the demo corpus) and the checkpoints of training runs whose model is published; run it "
                      "while no stage runs on this registry (a running stage may be reading a cache)")  # fmt: skip
    work.add_argument("--remove-stale", type=float, default=None, metavar="DAYS",
                      help="also remove abandoned work: unfinished runs, their training checkpoints and publishes "
                      "killed before their commit whose last write is older than DAYS days (a run going on writes "
                      "as it goes, and a running one is never taken; its rerun starts over)")  # fmt: skip

    find = command("find", "where a sample is: every dataset version holding a URL, key or image sha256 (kept, or "
                   "why dropped; its shard) and the models trained on it: what a takedown request asks", cmd_find)
    _sample_options(find)

    takedown = command("takedown", "take samples (by URL, key or image sha256) out of dataset versions: each that "
                       "keeps one gets a next version without them (their shards rewritten, their index rows dropped "
                       "as 'takedown'); then free the old one with `blip data rm OLD --data-only` (which also "
                       "writes its index, texts and source list again without them)", cmd_takedown)
    takedown.add_argument("refs", nargs="*", metavar="REF",
                          help="dataset versions to take them out of (default: every one that keeps one of them)")
    _sample_options(takedown)
    takedown.add_argument("--free-old", action="store_true",
                          help="then free the versions they replaced at once (`blip data rm OLD… --data-only`: their "
                          "shards go, their index, texts, source list and stats are written again without them)")

    rm = command("rm", "remove versions: whole (refused while a kept version was made from one), or only their data "
                 "files (--data-only: shards, weights, images; the record, index, stats and lineage stay; a version "
                 "a takedown replaced has them written again without what it took out)", cmd_rm)
    rm.formatter_class = argparse.RawDescriptionHelpFormatter
    rm.epilog = RM_HELP
    rm.add_argument("refs", nargs="+", metavar="REF", help="versions to remove (name@vN); a parent and the versions "
                    "made from it can go in one command")  # fmt: skip
    rm.add_argument("--data-only", action="store_true",
                    help="free the data files only: the version stays listed, browsable and diffable, its lineage "
                    "whole; a rerun of the stage that made it reuses it (what was made from it stays cached), a "
                    "stage that has to read its data refuses, naming the removal")  # fmt: skip
    rm.add_argument("--dry-run", action="store_true", help="say what would be removed and freed; remove nothing")
    rm.add_argument("--yes", "-y", action="store_true",
                    help="remove without asking (needed when stdin is not a terminal)")

    tag = command("tag", "give a version a movable name (name@prod): every command and config that takes a version "
                  "takes it; moving it keeps who moved it from which version", cmd_tag)
    tag.formatter_class = argparse.RawDescriptionHelpFormatter
    tag.epilog = TAG_HELP
    tag.add_argument("ref", metavar="REF", help="the version to tag (name@vN, or any reference)")
    tag.add_argument("tag", metavar="TAG", help="a lowercase name that is not 'latest', a version (v3) or hex")
    untag = command("untag", "remove a tag (name@tag); the version stays", cmd_untag)
    untag.add_argument("ref", metavar="NAME@TAG")

    catalog = command("catalog", "public sources and BLIP's 14M / 129M compositions", cmd_catalog)
    catalog.add_argument("name", nargs="?", help="a source or composition name")

    serve = command("serve", "browse the registry in a web browser", cmd_serve, json_option=False)
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    serve.add_argument("--wait-s", type=_seconds, default=WAIT_S, metavar="SECONDS",
                       help=f"how long a request waits for a long filter, histogram or diff before answering 202 "
                       f"with its progress (default {WAIT_S:g}; the page polls). A script reading the JSON API that "
                       "would rather block than poll can serve with a large value")  # fmt: skip

    publish = command("publish-downstream", "publish a downstream benchmark (annotation files + images) as a "
                      "dataset version for `blip finetune` / `blip eval`", cmd_publish_downstream)  # fmt: skip
    publish.formatter_class = argparse.RawDescriptionHelpFormatter
    publish.epilog = DOWNSTREAM_FILES_HELP
    publish.add_argument("benchmark", choices=DOWNSTREAM_BENCHMARKS)
    publish.add_argument("--annotations", required=True, metavar="DIR", help="directory of the annotation files")
    publish.add_argument("--images", required=True, metavar="DIR",
                         help="root the annotations' image paths are relative to (msrvtt: the directory of the .mp4s)")
    publish.add_argument("--name", required=True, help="dataset name; the version is NAME@vN")
    publish.add_argument("--samples-per-shard", type=int, default=1000, help="train samples per webdataset tar")
    publish.add_argument("--vqa-hold-out-val", action="store_true",
                         help="vqa: keep vqa_val.json out of the train shards (BLIP trains on it, which makes val "
                         "accuracy optimistic)")  # fmt: skip

    model = command("publish-model", "publish a checkpoint (BLIP's or LAVIS's release, a transformers or our "
                    "directory) as a model version, e.g. BLIP's captioner and filter for `blip capfilt`",
                    cmd_publish_model)  # fmt: skip
    model.add_argument("source", help="official .pth (path or URL), a checkpoint name (`blip infer models`: "
                       "model_base_caption_capfilt_large, blip_retrieval/coco, ...), a transformers BLIP directory or "
                       "hub name, or a save_pretrained directory")  # fmt: skip
    model.add_argument("--name", required=True, help="model name; the version is NAME@vN")
    model.add_argument("--kind", default=None, choices=MODEL_KINDS,
                       help="the task model to publish (default: the checkpoint's own; a pretrain or retrieval file "
                       "can be published as 'itm', a pretrain file as 'caption', ...)")  # fmt: skip
    model.add_argument("--image-size", type=int, default=None,
                       help="image size to publish at (default: the checkpoint's; position embeddings interpolated)")

    export_model = command("export-model", "write a model version (or any checkpoint) as salesforce/BLIP's .pth or a "
                           "transformers directory, for code outside this pipeline", cmd_export_model)  # fmt: skip
    export_model.add_argument("source", help="a model version (name, name@vN) or any checkpoint `blip infer` takes")
    export_model.add_argument("--out", required=True, type=Path, help="the file (blip-pth) or directory "
                              "(transformers) to write; must not exist")  # fmt: skip
    export_model.add_argument("--format", dest="export_format", choices=("blip-pth", "transformers"),
                              default="transformers",
                              help="transformers (default): BlipForConditionalGeneration / BlipForImageTextRetrieval "
                              "/ BlipForQuestionAnswering and a BlipProcessor, loaded with from_pretrained(OUT) (note "
                              "transformers' ITM feeds [CLS] where BLIP trained with [ENC]); blip-pth: {'model': "
                              "state_dict} as BLIP's released files, for BLIP's and LAVIS's code")  # fmt: skip
    export_model.add_argument("--kind", default=None, choices=MODEL_KINDS,
                              help="the task model to export (default: the checkpoint's own; a pretraining model to "
                              "transformers: 'caption' or 'itm')")  # fmt: skip

    data.set_defaults(func=lambda args: _help(data))


MODEL_KINDS = ("pretrain", "retrieval", "itm", "caption", "vqa", "nlvr", "features")  # blip_models.MODEL_CLASSES


def cmd_publish_model(args: argparse.Namespace) -> int:
    from blip_models.checkpoints import CheckpointError
    from pipelines.tasks.publish_model import publish_model

    registry = _registry(args)
    try:
        manifest = publish_model(args.source, name=args.name, registry=registry, kind=args.kind,
                                 image_size=args.image_size)  # fmt: skip
    except (OSError, CheckpointError) as error:
        raise UserError(f"publish-model {args.source}: {error}") from None
    if args.json:
        _print_json({**_summary(manifest), "metadata": manifest.metadata})
        return 0
    meta = manifest.metadata
    arch = meta["architecture"]
    print(f"{manifest.ref}  id {manifest.short_id}  a '{meta['kind']}' model, ViT {arch['vision_depth']} x "
          f"{arch['vision_width']} at {meta['image_size']} px, {arch['text_layers']} text layers; from "
          f"{meta['source']['checkpoint']} ({meta['source']['format']}, sha256 {meta['source']['sha256'][:12]})")
    print("  load: " + meta["load"].replace("\n", "\n  "))
    role = {"caption": "--captioner", "itm": "--filter", "retrieval": "--filter"}.get(meta["kind"])
    if role:
        print(f"  use: blip capfilt CONFIG --dataset REF {role} {manifest.ref} ... --registry {registry.url}")
    return 0


def cmd_export_model(args: argparse.Namespace) -> int:
    from blip_models.checkpoints import CheckpointError
    from pipelines.commands.infer import checkpoint_source
    from pipelines.tasks.publish_model import export_model

    source = checkpoint_source(args.source, getattr(args, "registry", None))
    try:
        kind = export_model(source, args.out, args.export_format, kind=args.kind)
    except (OSError, ValueError, CheckpointError) as error:
        pretraining = "no BLIP class for a 'pretrain'" in str(error)
        hint = " (a pretraining model: --kind caption or --kind itm)" if pretraining else ""
        raise UserError(f"export-model {args.source}: {error}{hint}") from None
    if args.json:
        _print_json({"source": args.source, "out": str(args.out), "format": args.export_format, "kind": kind})
        return 0
    if args.export_format == "transformers":
        from blip_models.hf_convert import HF_CLASS_BY_KIND

        load = f"transformers' BlipProcessor.from_pretrained(OUT), {HF_CLASS_BY_KIND[kind]}.from_pretrained(OUT)"
    else:
        load = "salesforce/BLIP's blip_*(pretrained=OUT), LAVIS's load_from_pretrained(OUT)"
    print(f"wrote the '{kind}' model {args.source} to {args.out} ({args.export_format}); load: {load}")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from datasets_manifests.locate import find_samples, trained_on

    registry = _registry(args)
    urls = _wanted_urls(args, "find")
    with tqdm(desc="searching indexes", unit="version", file=sys.stderr, disable=None) as bar:
        found = find_samples(registry, urls=urls, keys=args.key, sha256s=args.sha256,
                             on_version=lambda _: bar.update())  # fmt: skip
    kept_in = sorted({item.ref for item in found if item.status == "ok"})
    models = trained_on(registry, kept_in)
    if args.json:
        _print_json({"found": [item.to_dict() for item in found], "kept_in": kept_in,
                     "trained_on_it": [{"ref": m.ref, "kind": m.kind} for m in models]})  # fmt: skip
        return 0 if found else 1
    if not found:
        print(f"not found in any dataset version of {registry.url}")
        return 1
    for item in found:
        state = "kept" if item.status == "ok" else f"dropped ({item.drop_reason})"
        where = f"{item.split} split, {item.shard}" if item.shard else "no shard"
        removed = "; its data files were removed" if item.data_removed else ""
        print(f"{item.ref}  {item.key}  {state}  {where}  {item.url or '-'}  {item.caption or ''!r}{removed}")
    print(f"{len(found)} rows in {len({item.ref for item in found})} versions; kept in {', '.join(kept_in) or 'none'}")
    if models:
        print("made from the versions that keep it: " + ", ".join(f"{m.ref} ({m.kind})" for m in models))
    return 0


def _sample_options(parser: argparse.ArgumentParser) -> None:
    """The samples `find` and `takedown` look for: by URL (or a file of them), key or image sha256."""
    parser.add_argument("--url", action="append", default=[], help="an image URL (repeatable)")
    parser.add_argument("--urls", type=Path, default=None, metavar="FILE", help="a file of URLs, one a line")
    parser.add_argument("--key", action="append", default=[], help="a sample key (repeatable)")
    parser.add_argument("--sha256", action="append", default=[], type=_sha256_hex,
                        help="the sha256 of an image's bytes, 64 hexadecimal digits (repeatable)")


def _sha256_hex(value: str) -> str:
    """A cut or mistyped hash would be found nowhere and said "not found": refused instead."""
    text = value.strip().lower()
    if len(text) != 64 or any(char not in "0123456789abcdef" for char in text):
        raise argparse.ArgumentTypeError(f"not a sha256 (64 hexadecimal digits): {value!r}")
    return text


def _wanted_urls(args: argparse.Namespace, command: str) -> list[str]:
    """--url and the lines of --urls FILE; an error when no sample is named at all."""
    urls = list(args.url)
    if args.urls is not None:
        try:
            urls += [line.strip() for line in args.urls.read_text(encoding="utf-8").splitlines() if line.strip()]
        except OSError as error:
            raise UserError(f"--urls {args.urls}: {error}") from None
    if not (urls or args.key or args.sha256):
        raise UserError(f"blip data {command}: give --url, --urls FILE, --key or --sha256")
    return urls


def cmd_takedown(args: argparse.Namespace) -> int:
    from datasets_manifests.locate import find_samples, trained_on
    from pipelines.tasks.takedown import run_takedown

    registry = _registry(args)
    urls = _wanted_urls(args, "takedown")
    refs = [registry.resolve(ref, "dataset").ref for ref in args.refs]
    if not refs:  # every version that keeps one (`blip data find`), but those a takedown already replaced
        found = find_samples(registry, urls=urls, keys=args.key, sha256s=args.sha256)
        replaced = {parent for m in registry.list("dataset") if m.producer.stage == TAKEDOWN_STAGE
                    for parent in m.parents}  # fmt: skip
        refs = sorted({item.ref for item in found if item.status == "ok" and not item.data_removed} - replaced)
    results = []
    for ref in refs:
        try:
            new = run_takedown(registry, ref, urls=urls, keys=args.key, sha256s=args.sha256)
        except ValueError as error:
            raise UserError(f"takedown {ref}: {error}") from None
        results.append((ref, new))
    done = [(ref, new) for ref, new in results if new is not None]
    models = trained_on(registry, [ref for ref, _ in done])
    old = _replaced_lines(registry, [new for _, new in done])
    freed = _free_old(registry, old) if old and args.free_old else []
    if args.json:
        versions = [{"from": ref, "to": new.ref if new else None,
                     "taken_down": new.counts.get("taken_down", 0) if new else 0} for ref, new in results]
        _print_json({"versions": versions, "trained_on_old": [m.ref for m in models], "old": old,
                     "freed": [removal.to_dict() for removal in freed]})  # fmt: skip
        return 0
    if not results:
        print(f"no dataset version of {registry.url} keeps them, but those a takedown replaced (`blip data find` "
              "lists them; `blip data rm REF --data-only` frees their data)")
    for ref, new in results:
        if new is None:
            print(f"{ref}: keeps none of them")
        else:
            print(f"{ref} -> {new.ref}: {new.counts['taken_down']} samples taken out "
                  f"({new.stats['takedown']['shards_rewritten']} shards rewritten)")
            if unchanged := new.stats["takedown"].get("unchanged"):
                print(f"  the same files (they name no url; look at them): {', '.join(unchanged)}")
    if freed:
        for removal in freed:
            print(f"freed {removal.manifest.ref}: {len(removal.files)} files, {_size(removal.bytes)}"
                  + ("" if removal.scrub is None else f"; {', '.join(removal.scrub.files)} written again as "
                     f"{removal.scrub.newest.ref} has them"))  # fmt: skip
    elif old:
        print(f"free the old versions' data: blip data rm {' '.join(old)} --data-only (their records stay; their "
              "indexes, texts, source lists and stats are written again without these samples' texts and rows)")
    if models:
        print("made from the old versions (a takedown does not change them): "
              + ", ".join(f"{m.ref} ({m.kind})" for m in models))
    return 0


def _replaced_lines(registry: Any, newest: list[Any]) -> list[str]:
    """The versions before each of `newest` in its line of takedowns: a version two takedowns back still names
    the samples the last one took out."""
    return sorted({m.ref for new in newest for m in registry.versions("dataset", new.name)
                   if m.id != new.id and (last := registry.replaced_by(m)) is not None and last.id == new.id})


def _free_old(registry: Any, refs: list[str]) -> list[Any]:
    """`blip data rm REFS --data-only`, for `takedown --free-old`; a refusal (a run still reading one) is said as
    rm says it, after the takedown's versions are published."""
    from datasets_manifests.removal import RemovalRefused, plan_removals, remove

    try:
        plan = plan_removals(registry, refs, data_only=True)
    except RemovalRefused as error:
        raise UserError(f"the takedown's versions are published; freeing the old ones was {error}") from None
    for removal in plan:
        remove(registry, removal)
    return plan


TAG_HELP = """\
A tag names one version of a name and moves when it is set again; a reference NAME@TAG works wherever a
version is asked for (blip capfilt --captioner / --filter, blip train --dataset / --init, blip data show). What a
stage makes records its inputs by content id, so moving a tag changes no lineage and no cache. A version with a
tag is not removed whole (move or remove the tag first).
examples:
  blip data tag blip-captioner@v3 prod       set (or move) blip-captioner@prod
  blip data show blip-captioner@prod         which version it names, since when, and the versions before
  blip data untag blip-captioner@prod"""


def cmd_tag(args: argparse.Namespace) -> int:
    from datasets_manifests.tags import set_tag

    registry = _registry(args)
    manifest, before = set_tag(registry, args.ref, args.tag)
    was = None if before is None else before.get("version")
    if args.json:
        _print_json({"tag": f"{manifest.name}@{args.tag}", "ref": manifest.ref, "before": was})
    elif was == manifest.version:
        print(f"{manifest.name}@{args.tag} names {manifest.ref} already")
    else:
        print(f"{manifest.name}@{args.tag} -> {manifest.ref}" + (f" (was {manifest.name}@{was})" if was else ""))
    return 0


def cmd_untag(args: argparse.Namespace) -> int:
    from datasets_manifests.tags import remove_tag

    record = remove_tag(_registry(args), args.ref)
    if args.json:
        _print_json({"removed": args.ref, "ref": f"{record['name']}@{record['version']}"})
    else:
        print(f"removed {args.ref} (it named {record['name']}@{record['version']}; the version stays)")
    return 0


RM_HELP = """\
A removal is recorded in <registry>/.removed/ before anything is deleted: a removal stopped half-way is
finished by running it again, a removed version's name (name@vN) is never given again, and asking for it
says when and where it was removed. Neither form removes a version an unfinished stage run reads
(`blip data work` lists them). Run it while no stage reads the versions you remove.
examples:
  blip data rm raw@v1 --data-only          free a download once its training shards are made
  blip data rm raw@v1 --data-only          after `blip data takedown` made raw@v2: also writes raw@v1's index,
                                           texts, source list and stats again as raw@v2 has them (run it again
                                           after a further takedown of raw@v2: as raw@v3 has them)
  blip data rm capfilt@v2 pretrain@v3      a bootstrapped set and the model trained on it, together"""


def cmd_rm(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from datasets_manifests.removal import finish_removals, plan_removals, remove

    registry = _registry(args)
    for place in finish_removals(registry):
        print(f"finished an earlier removal stopped half-way: {place}", file=sys.stderr)
    plan = plan_removals(registry, args.refs, data_only=args.data_only)

    def described(removal: Any) -> str:
        part = "its data files" if removal.data_only else "whole"
        shared = f" ({_size(removal.shared_bytes)} of it stays: hard links of another version)" \
            if removal.shared_bytes else ""  # fmt: skip
        scrub = "" if removal.scrub is None else f"; {', '.join(removal.scrub.files)} written again as " \
            f"{removal.scrub.newest.ref} has them (what its takedowns took out: texts, urls)"  # fmt: skip
        return f"{removal.manifest.ref} ({removal.manifest.kind}, {part}): {len(removal.files)} files, " \
            f"{_size(removal.bytes)}{shared}{scrub}"  # fmt: skip

    total = _size(sum(removal.bytes - removal.shared_bytes for removal in plan))
    if args.dry_run:
        if args.json:
            _print_json({"dry_run": True, "removals": [removal.to_dict() for removal in plan]})
            return 0
        for removal in plan:
            print(f"would remove {described(removal)}")
        print(f"{total} freed in all; nothing removed (--dry-run)")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("blip data rm asks before it removes: pass --yes (--dry-run says what it would remove)")
        for removal in plan:
            print(f"will remove {described(removal)}")
        if input(f"remove {len(plan)} version(s), freeing {total}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 1
    with tqdm(total=sum(len(removal.files) for removal in plan), unit="file", desc="removing", file=sys.stderr,
              disable=None) as bar:  # fmt: skip
        for removal in plan:
            remove(registry, removal, on_files=bar.update)
            if not args.json:
                tqdm.write(f"removed {described(removal)}")
    if args.json:
        _print_json({"dry_run": False, "removals": [removal.to_dict() for removal in plan]})
    return 0


DOWNSTREAM_BENCHMARKS = ("coco", "flickr", "vqa", "nlvr", "msrvtt", "nocaps", "vg_caption")
DOWNSTREAM_FILES_HELP = """\
files expected in --annotations (the public files BLIP / LAVIS download, unchanged):
  coco        coco_karpathy_{train,val,test}.json, coco_gt/coco_karpathy_{val,test}_gt.json
              (--images: the COCO root holding train2014/ and val2014/)
  flickr      flickr30k_{train,val,test}.json  (--images: the root holding flickr30k-images/)
  vqa         vqa_train.json, vqa_val.json, vqa_test.json, answer_list.json, [vg_qa.json],
              v2_OpenEnded_mscoco_val2014_questions.json, v2_mscoco_val2014_annotations.json
              (--images: the root the "image" fields are relative to: train2014/, val2014/, test2015/, VG image/)
  nlvr        nlvr_train.json, nlvr_dev.json, nlvr_test.json  (--images: the root holding images/ and dev/)
  msrvtt      msrvtt_test.jsonl  (--images: the directory of <clip_name>.mp4)
  nocaps      nocaps_val.json, nocaps_test.json  (--images: the root of their "image" paths)
  vg_caption  vg_caption.json  (--images: the Visual Genome image root)
A malformed file fails naming the file, the record and the field; a missing val/test image is an error, a
missing train image a counted drop. Publishing the same files again returns the existing version."""


def cmd_publish_downstream(args: argparse.Namespace) -> int:
    from pipelines.tasks.downstream import DownstreamConfig, publish_downstream

    registry = _registry(args)
    try:
        cfg = DownstreamConfig(kind="files", benchmark=args.benchmark, annotation_dir=args.annotations,
                               image_root=args.images, samples_per_shard=args.samples_per_shard,
                               vqa_train_on_val=not args.vqa_hold_out_val)  # fmt: skip
        manifest = publish_downstream(cfg, name=args.name, registry=registry)
    except (OSError, ValueError) as error:  # AnnotationError is a ValueError naming file, record and field
        raise UserError(f"publish-downstream {args.benchmark}: {error}") from None
    if args.json:
        _print_json(_summary(manifest))
        return 0
    splits = ", ".join(f"{split} {count}" for split, count in manifest.splits.items())
    print(f"{manifest.ref}  id {manifest.short_id}  {args.benchmark} ({manifest.metadata.get('format')})  {splits}")
    if manifest.drop_reasons:
        print(f"  dropped: {', '.join(f'{k} {v}' for k, v in manifest.drop_reasons.items())}")
    uses = {"msrvtt": "blip eval video", "nocaps": "blip eval caption"}.get(args.benchmark, "blip finetune/eval TASK")
    if args.benchmark != "vg_caption":  # VG captions are pretraining pairs, not an evaluation set
        print(f"  use: {uses} ... --dataset {manifest.ref} --registry {registry.url}")
    return 0


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(args.registry or default_registry_url())


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def _print_table(rows: list[tuple[str, ...]]) -> None:
    """Left-aligned columns, two spaces apart (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _size(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{num_bytes} B"


def _samples_of(manifest: Manifest) -> str:
    if manifest.kind != "dataset":
        return "-"
    counts = manifest.counts
    for key in ("ok", "kept", "samples"):
        if key in counts:
            return str(counts[key])
    return str(manifest.num_samples)


# --------------------------------------------------------------------------- work
def cmd_work(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from datasets_manifests.ops import remove_work_entry, work_entries

    registry = _registry(args)
    entries = work_entries(registry)
    by_key = {entry.key: entry for entry in entries}
    unknown = [key for key in args.remove if key not in by_key]
    if unknown:
        raise UserError(f"no work {unknown[0]!r} in {registry.url} (`blip data work` lists what there is)")
    if args.remove_stale is not None and not args.remove_stale >= 0:
        raise UserError(f"--remove-stale takes a number of days >= 0, got {args.remove_stale}")
    stale_before = time.time() - args.remove_stale * 86400 if args.remove_stale is not None else None

    def wanted(entry: Any) -> bool:
        if entry.key in args.remove:
            return True
        if args.remove_leftovers and entry.removable_as_leftover:
            return True
        return (stale_before is not None and not entry.removable_as_leftover and entry.state != "running"
                and entry.modified is not None and entry.modified < stale_before)  # fmt: skip

    chosen = [entry for entry in entries if wanted(entry)]
    if chosen:
        for entry in chosen:
            for place in remove_work_entry(registry, entry):
                print(f"removed {place} ({_size(entry.bytes)}, {entry.state}: {entry.what})", file=sys.stderr)
        entries = work_entries(registry)
    if args.json:
        _print_json([entry.to_dict() for entry in entries])
        return 0
    if not entries:
        print(f"no work left in {registry.url}")
        return 0

    def when(seconds: float | None) -> str:
        return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M") if seconds else "-"

    rows = [("WORK", "WHAT", "STATE", "SIZE", "FILES", "LAST WRITE", "DETAIL")]
    rows += [(e.key, e.what, e.state, _size(e.bytes), str(e.files), when(e.modified), e.detail) for e in entries]
    _print_table(rows)
    total = sum(e.bytes for e in entries)
    spare = sum(e.bytes for e in entries if e.removable_as_leftover)
    print(f"{len(entries)} in all, {_size(total)}; {_size(spare)} of it no rerun needs (--remove-leftovers)")
    return 0


# --------------------------------------------------------------------------- ls / show
def cmd_ls(args: argparse.Namespace) -> int:
    from datasets_manifests.tags import tags_by_id

    registry = _registry(args)
    manifests = [m for m in registry.list(args.kind) if args.name is None or m.name == args.name]
    removed = registry.removed_versions()  # one listing: the versions whose data files `blip data rm` removed
    tags = tags_by_id(registry)
    if args.json:
        _print_json([{**_summary(m), "data_removed": (m.kind, m.name, m.version) in removed,
                      "tags": tags.get(m.id, [])} for m in manifests])  # fmt: skip
        return 0
    if not manifests:
        print(f"no versions in {registry.url}")
        return 0
    rows = [("VERSION", "KIND", "ID", "STAGE", "SAMPLES", "SIZE", "PARENTS", "FINISHED", "TAGS")]
    rows += [(m.ref, m.kind, m.short_id, m.producer.stage, _samples_of(m),
              "data removed" if (m.kind, m.name, m.version) in removed else _size(_bytes_of(m)),
              ",".join(m.parents) or "-", m.producer.finished_at or "-", ",".join(tags.get(m.id, [])) or "-")
             for m in manifests]  # fmt: skip
    _print_table(rows)
    return 0


def _bytes_of(manifest: Manifest) -> int:
    return sum(entry.bytes for entry in manifest.files)


def _summary(manifest: Manifest) -> dict[str, Any]:
    return {
        "ref": manifest.ref, "kind": manifest.kind, "id": manifest.id, "stage": manifest.producer.stage,
        "counts": manifest.counts, "parents": list(manifest.parents), "finished_at": manifest.producer.finished_at,
        "bytes": _bytes_of(manifest),
    }


def cmd_show(args: argparse.Namespace) -> int:
    from datasets_manifests.ops import lineage
    from datasets_manifests.tags import tags_of_version

    registry = _registry(args)
    manifest = registry.resolve(args.ref)
    tree = lineage(registry, manifest)
    if args.json:
        data = json.loads(manifest.to_json())
        data["lineage"] = tree.to_dict()
        data["tags"] = {tag: {k: v for k, v in record.items() if k not in ("kind", "name", "tag")}
                        for tag, record in tags_of_version(registry, manifest).items()}  # fmt: skip
        _print_json(data)
        return 0
    for line in show_lines(registry, manifest):
        print(line)
    print("lineage:")
    for line in tree.render():
        print(f"  {line}")
    from datasets_manifests.browser import version_url

    print(f"browse: blip data serve --registry {registry.url}  then open {version_url(manifest)}")
    if manifest.kind == "dataset" and any(e.role == "index" for e in manifest.files):
        print(f"samples: blip data --registry {registry.url} samples {manifest.ref} --where status=dropped")
        print(f"export: blip data --registry {registry.url} export {manifest.ref} --out {manifest.name}.json "
              f"[--images DIR]")  # fmt: skip
    elif manifest.kind == "model" and any(Path(e.path).name == "config.json" for e in manifest.files):
        print(f"export: blip data --registry {registry.url} export-model {manifest.ref} --out {manifest.name}-hf "
              f"[--format blip-pth]")  # fmt: skip
    return 0


def show_lines(registry: Registry, manifest: Manifest) -> list[str]:
    from datasets_manifests.tags import tags_of_version

    producer = manifest.producer
    lines = [
        f"{manifest.kind} {manifest.ref}  id {manifest.id}",
        f"  producer: stage {producer.stage}, config {producer.config_hash[:12] or '-'}, "
        f"code {producer.code_version or '-'}, finished {producer.finished_at or '-'}",
    ]
    if manifest.parents:
        lines.append(f"  parents: {', '.join(manifest.parents)}")
    for tag, record in tags_of_version(registry, manifest).items():
        before = ", ".join(entry["version"] for entry in record.get("history", []))  # newest first
        lines.append(f"  tag {manifest.name}@{tag}: since {record.get('tagged_at')} by {record.get('by')}"
                     + (f" (before: {before})" if before else ""))
    if manifest.counts:
        lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in manifest.counts.items()))
    if manifest.splits:
        lines.append("  splits: " + ", ".join(f"{k}={v}" for k, v in manifest.splits.items()))
    if manifest.drop_reasons:
        dropped = sum(manifest.drop_reasons.values())
        lines.append(f"  drop reasons ({dropped} dropped):")
        for reason, count in sorted(manifest.drop_reasons.items(), key=lambda item: -item[1]):
            lines.append(f"    {reason:<28} {count:>10}  {100 * count / max(dropped, 1):5.1f}%")
    for stage, stats in manifest.stats.items():
        text = json.dumps(stats, sort_keys=True, default=str) if isinstance(stats, (dict, list)) else str(stats)
        lines.append(f"  stats {stage}: {text if len(text) <= 160 else text[:157] + '...'}")
    shards = manifest.shards()
    other = [e for e in manifest.files if e.role != "shard"]
    if shards:
        total = sum(e.bytes for e in shards)
        lines.append(f"  shards: {len(shards)} files, {manifest.num_samples} samples, {_size(total)}")
    for entry in other:
        lines.append(f"  file {entry.path} ({entry.role}, {_size(entry.bytes)})")
    if manifest.sample_schema:
        lines.append("  sample fields: " + ", ".join(f"{k} ({v})" for k, v in manifest.sample_schema.items()))
    removal = registry.removal(manifest)
    if removal is not None:
        lines.append(f"  data files removed on {removal.get('removed_at', '?')} on {removal.get('host', '?')} "
                     f"(`blip data rm`; {len(removal.get('files', []))} files, {_size(removal.get('bytes', 0))}): the "
                     "record, index and stats remain, stages cannot read it")  # fmt: skip
    lines.append(f"  registry: {registry.url}")
    return lines


# --------------------------------------------------------------------------- lineage / diff / verify
def cmd_lineage(args: argparse.Namespace) -> int:
    from datasets_manifests.ops import lineage

    tree = lineage(_registry(args), args.ref)
    if args.json:
        _print_json(tree.to_dict())
    else:
        print("\n".join(tree.render()))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from datasets_manifests.ops import diff

    result = diff(_registry(args), args.ref_a, args.ref_b, limit=args.n, progress=True)
    if args.json:
        _print_json(result.to_dict())
        return 0
    counts = result.counts
    if counts:
        print(f"{result.a} -> {result.b}: {counts['a']} -> {counts['b']} samples ({counts['common']} in both)")
        print(f"  added {counts['added']}, removed {counts['removed']}, re-captioned {counts['recaptioned']}, "
              f"newly dropped {counts['newly_dropped']}, restored {counts['restored']}")
    else:
        print(f"{result.a} -> {result.b}: no per-sample index on either side; manifest differences only")
    for key in result.added:
        print(f"  + {key}")
    for key in result.removed:
        print(f"  - {key}")
    for item in result.recaptioned:
        print(f"  ~ {item['key']}: {item['a']!r} -> {item['b']!r}")
    for item in result.newly_dropped:
        print(f"  x {item['key']}: {item['reason']}")
    for key in result.restored:
        print(f"  ^ {key}")
    for field, change in result.manifest_changes.items():
        print(f"  manifest {field}: {json.dumps(change, default=str)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from datasets_manifests.ops import verify

    registry = _registry(args)
    manifest = registry.resolve(args.ref)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers {args.workers}: must be at least 1")
    problems = verify(registry, manifest, workers=args.workers, progress=True)
    if args.json:
        _print_json({"ref": manifest.ref, "id": manifest.id, "ok": not problems, "problems": problems})
    elif problems:
        for problem in problems:
            print(f"{manifest.ref}: {problem}", file=sys.stderr)
    else:
        removed = set((registry.removal(manifest) or {}).get("files", ()))
        kept = [e for e in manifest.files if e.path not in removed]
        note = f"; {len(removed)} data files removed by `blip data rm`, not checked" if removed else ""
        print(f"{manifest.ref}: ok ({len(kept)} files, {_size(sum(e.bytes for e in kept))}, sha256 verified{note})")
    return 1 if problems else 0


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from datasets_manifests.export import export_images, export_texts

    registry = _registry(args)
    manifest = registry.resolve(args.ref, kind="dataset")
    images = None
    if args.images is not None:
        with tqdm(total=len(manifest.shards()), unit="shard", desc=f"images of {manifest.ref}", file=sys.stderr,
                  disable=None) as bar:  # fmt: skip
            images = export_images(registry, manifest, args.images, on_shard=bar.update)
    total = (manifest.counts or {}).get("total")  # index rows, for the progress bar
    with tqdm(total=total, unit="sample", desc=f"export {manifest.ref}", file=sys.stderr, disable=None) as bar:
        counts = export_texts(registry, manifest, args.out, args.export_format, args.source, on_rows=bar.update,
                              images=args.images)  # fmt: skip
    if args.json:
        _print_json({"ref": manifest.ref, "out": args.out, "format": args.export_format, "texts": counts,
                     **({"images": {"dir": str(args.images), **images}} if images else {})})  # fmt: skip
    else:
        without = counts.pop("no_image", 0)
        written = ", ".join(f"{n:,} {source}" for source, n in sorted(counts.items())) or "no texts"
        written += f" ({without:,} texts of samples without an image left out)" if without else ""
        print(f"{manifest.ref}: {written} -> {args.out}")
        if images:
            print(f"  images: {images['images']:,} written from {images['shards']} shards into {args.images}"
                  + (f" ({images['shards_already']} shards written by an earlier run)" if images["shards_already"]
                     else ""))  # fmt: skip
    return 0


# --------------------------------------------------------------------------- samples
_WHERE = re.compile(r"^([A-Za-z_][\w.-]*)(>=|<=|>|<|=)(.*)$", re.DOTALL)


def parse_where(items: list[str]) -> dict[str, Any]:
    """['status=dropped', 'split=train', 'split=val'] -> {'status': 'dropped', 'split': ['train', 'val']};
    ['similarity>=0.28', 'similarity<0.4'] -> {'similarity': [Compare('>=', '0.28'), Compare('<', '0.4')]}."""
    from datasets_manifests.index import Compare

    where: dict[str, Any] = {}
    for item in items:
        match = _WHERE.match(item)
        if match is None:
            raise UserError(f"--where {item!r}: expected COL=VAL, or COL>=VAL (>, <=, <)")
        column, op, value = match.groups()
        if op != "=":
            where.setdefault(column, []).append(Compare(op, value))
        elif column in where:
            previous = where[column]
            where[column] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            where[column] = value
    return where


def cmd_samples(args: argparse.Namespace) -> int:
    from datasets_manifests.index import SOURCE_COLUMNS, finite_or_none, query_samples

    registry = _registry(args)
    manifest = registry.resolve(args.ref)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()] if args.columns else None
    if args.n < 0 or args.offset < 0:
        raise UserError("--n and --offset must be >= 0")
    page, total = query_samples(registry, manifest, where=parse_where(args.where), text=args.text,
                                limit=args.n, offset=args.offset, columns=columns)
    rows = page.to_pylist()
    if args.json:  # a NaN score (a source list may have them) as null: `NaN` is not JSON
        rows = [{column: finite_or_none(value) for column, value in row.items()} for row in rows]
        _print_json({"ref": manifest.ref, "total": total, "offset": args.offset, "rows": rows})
        return 0
    print(f"{manifest.ref}: {total} matching samples; showing {len(rows)} from {args.offset}")
    carried = [name for name in manifest.metadata.get(SOURCE_COLUMNS) or [] if name in page.column_names]
    for row in rows:
        print(_sample_line(row, carried) if columns is None else "  " + "  ".join(f"{c}={row[c]!r}" for c in columns))
    return 0


def _sample_line(row: dict[str, Any], carried: list[str]) -> str:
    """A sample on one line: key, status, split, size, the source list's columns (a CLIP score), caption."""
    caption = row.get("caption") or ""
    caption = caption if len(caption) <= 70 else caption[:67] + "..."
    size = f"{row.get('width')}x{row.get('height')}" if row.get("width") is not None else "-"
    status = row.get("status", "?")
    if status != "ok":
        status = f"{status}:{row.get('drop_reason')}"
    listed = "".join(f"  {name}={_short(row[name])}" for name in carried)
    return f"  {row.get('key')}  [{status}]  {row.get('split') or '-'}  {size}{listed}  {caption!r}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else "-" if value is None else str(value)


# --------------------------------------------------------------------------- catalog / serve
def cmd_catalog(args: argparse.Namespace) -> int:
    import dataclasses

    from datasets_manifests import catalog

    try:
        if args.name:
            names = {s.name for s in catalog.list_sources()}
            entry = catalog.get_source(args.name) if args.name in names else catalog.composition(args.name)
            if args.json:
                _print_json(dataclasses.asdict(entry))
            else:
                print("\n".join(catalog.describe(entry)))
            return 0
        sources, compositions = catalog.list_sources(), catalog.list_compositions()
    except catalog.CatalogError as error:
        raise UserError(str(error)) from error
    if args.json:
        _print_json({"sources": [dataclasses.asdict(s) for s in sources],
                     "compositions": [dataclasses.asdict(c) for c in compositions]})
        return 0
    print("sources:")
    for source in sources:
        count = next((c.describe() for c in source.counts), "")
        print(f"  {source.name:<24} {source.category:<13} {source.title}{f'  ({count})' if count else ''}")
    print("compositions:")
    for item in compositions:
        print(f"  {item.name:<24} {'+'.join(item.sources)}")
    print("details: blip data catalog NAME")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    registry_url = args.registry or default_registry_url()
    Registry(registry_url, create=False)  # fail fast, in one line, on a bad URL or a missing directory (never create it)
    try:
        from datasets_manifests.browser.app import serve
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("datasets_manifests.browser"):
            raise
        raise UserError("the web browser (datasets_manifests.browser) is not installed") from error
    serve(registry_url, args.host, args.port, args.wait_s)
    return 0
