"""`blip demo-corpus write|serve`, `blip download`, `blip shard`: the data stages from the command line.

Thin: parse arguments, load the typed config (`--config PRESET|FILE`, `--set key=value`), call the stage function,
print the published version. Heavy imports happen inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pipelines.cli import CommandError
from pipelines.config import CONFIG_DIR


def register(subparsers: Any) -> None:
    corpus = subparsers.add_parser(
        "demo-corpus", help="write or serve the synthetic noisy web corpus (with ground truth)",
        description="A seeded corpus of rendered shape scenes with true captions, a controlled fraction of noisy "
        "web texts and broken records (404, corrupt, empty, HTML, oversized, CMYK, greyscale, PNG alpha) and, "
        "with --opt-out-fraction, images whose server opts out of AI use (X-Robots-Tag), served over HTTP on "
        "127.0.0.1 for the download stage.")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", metavar="ACTION", required=True)
    write = corpus_sub.add_parser("write", help="generate a corpus directory",
                                  description="Generate images/, ground_truth.parquet and corpus.json in DIR.")
    write.add_argument("directory", type=Path)
    # None = not given: the --config file's value (or DemoCorpusConfig's default) stays.
    write.add_argument("--n", type=int, default=None, help="number of records (default 5000)")
    write.add_argument("--seed", type=int, default=None, help="default 0")
    write.add_argument("--noise-fraction", type=float, default=None, help="share of web texts replaced by noise "
                       "(default 0.4)")
    write.add_argument("--bad-fraction", type=float, default=None, help="share of broken records (default 0.06)")
    write.add_argument("--opt-out-fraction", type=float, default=None, help="share of good records served with "
                       "`X-Robots-Tag: noai, noimageai`, which the download honours (default 0)")
    write.add_argument("--config", type=Path, default=None, help="a demo corpus YAML (configs/demo_corpus.yaml); "
                       "the options above override its values")
    write.set_defaults(func=cmd_corpus_write)
    serve = corpus_sub.add_parser("serve", help="serve a corpus on 127.0.0.1 until Ctrl-C",
                                  description="Serve DIR over HTTP and write DIR/source.parquet (url, caption) "
                                  "pointing at the server, ready for `blip download`.")
    serve.add_argument("directory", type=Path)
    serve.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    serve.set_defaults(func=cmd_corpus_serve)

    download = subparsers.add_parser(
        "download", help="download a source list with img2dataset into a raw dataset version",
        description="Read SOURCE (BLIP json list, or img2dataset csv/tsv/parquet), download it with img2dataset "
        "and publish the raw shards, their stats and index.parquet as NAME@vN. Re-running the same command "
        "resumes a crashed download (finished shards are kept) or returns the existing version. With "
        "--retry-failed REF, only the URLs that failed in REF are downloaded again.")
    download.add_argument("source", nargs="?", help="source list, a path or URL such as s3://... "
                          "(omit with --retry-failed)")
    download.add_argument("--name", required=True, help="dataset name in the registry, e.g. raw-demo")
    _common(download, "download")
    download.add_argument("--retry-failed", metavar="REF", default=None, help="re-download the failures of REF")
    download.set_defaults(func=cmd_download)

    shard = subparsers.add_parser(
        "shard", help="turn a raw version into training shards (dedup, caption cleaning, splits)",
        description="Decode-check, normalise captions (BLIP pre_caption), dedup by URL and image hash, split "
        "train/val by key hash, shuffle by seed and write gap-free shards/{split}-{i:06d}.tar with index.parquet. "
        "Every dropped sample is recorded with its reason. A download that carried its list's scores "
        "(save_additional_columns) can be filtered on them as DataComp and LAION filter on CLIP scores: --set "
        "source_bounds.similarity.min=0.28 drops a sample below (similarity_below_min) before decoding its image.")
    shard.add_argument("ref", help="raw dataset version, e.g. raw-demo@v1")
    shard.add_argument("--name", required=True, help="name of the training dataset, e.g. demo")
    shard.add_argument("--decontaminate", action="append", default=[], metavar="REF",
                       help="a downstream version (coco@v1, flickr@v1) whose val/test images must not be trained "
                       "on: near copies of them (256-bit difference hash within eval_overlap_max_distance bits, "
                       "default 10) are dropped as eval_overlap; repeatable")  # fmt: skip
    _common(shard, "shard")
    shard.set_defaults(func=cmd_shard, on_interrupt="the same command goes on from where this run stopped")


OVERRIDE_EXAMPLES = {"download": "processes=4", "shard": "samples_per_shard=5000"}  # keys of each stage's config


def _common(parser: argparse.ArgumentParser, stage: str) -> None:
    presets = ", ".join(sorted(path.stem for path in (CONFIG_DIR / stage).glob("*.yaml")))
    parser.add_argument("--config", default="default", metavar="PRESET|FILE",
                        help=f"stage config: a preset in configs/{stage}/ ({presets}) or a YAML file (default: default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"config override, e.g. --set {OVERRIDE_EXAMPLES[stage]}; repeatable")
    parser.add_argument("--registry", default=None, help="registry URL (default $BLIP_REGISTRY or ./artifacts/registry)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def stage_config_path(stage: str, preset_or_path: str | Path) -> Path:
    """A preset name under configs/<stage>/ (default, demo, ray ...) or a path to a YAML file."""
    text = str(preset_or_path)
    preset = CONFIG_DIR / stage / f"{text}.yaml"
    if not text.endswith((".yaml", ".yml")) and "/" not in text and preset.exists():
        return preset
    path = Path(text)
    if not path.exists():
        presets = ", ".join(sorted(p.stem for p in (CONFIG_DIR / stage).glob("*.yaml")))
        raise CommandError(f"--config {text}: neither a {stage} preset ({presets}) nor an existing file")
    return path


def _registry(url: str | None) -> Any:
    from datasets_manifests.registry import Registry
    from datasets_manifests.sources import missing_filesystem_message

    try:
        return Registry(url)
    except ImportError as error:  # fsspec: "Install s3fs to access S3"
        raise CommandError(missing_filesystem_message(str(url), error)) from None


def cmd_corpus_write(args: argparse.Namespace) -> int:
    from pipelines.config import build, load_config, to_dict
    from pipelines.tasks.demo_corpus import DemoCorpusConfig, write_corpus

    given = {key: value for key, value in (("n", args.n), ("seed", args.seed), ("noise_fraction", args.noise_fraction),
                                           ("bad_fraction", args.bad_fraction),
                                           ("opt_out_fraction", args.opt_out_fraction)) if value is not None}
    from_file = to_dict(load_config(DemoCorpusConfig, args.config)) if args.config else {}
    cfg = build(DemoCorpusConfig, {**from_file, **given}, origin="blip demo-corpus write options")
    started = time.perf_counter()
    summary = write_corpus(cfg, args.directory)
    print(f"wrote {cfg.n} records to {args.directory} in {time.perf_counter() - started:.1f}s: "
          f"{summary['noisy']} noisy texts, bad records {summary['bad_kinds']}")
    return 0


def cmd_corpus_serve(args: argparse.Namespace) -> int:
    from pipelines.tasks.demo_corpus import serve_corpus, write_source_list

    if not (args.directory / "ground_truth.parquet").exists():
        raise CommandError(f"{args.directory}: not a demo corpus (run `blip demo-corpus write {args.directory}`)")
    with serve_corpus(args.directory, port=args.port) as base_url:
        source = write_source_list(args.directory, base_url, args.directory / "source.parquet")
        print(f"serving {args.directory} at {base_url}  (source list: {source}); Ctrl-C to stop", flush=True)
        print(f"  next: blip download {source} --name raw-demo", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopped")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from datasets_manifests.sources import MissingFilesystemError
    from pipelines.config import load_config
    from pipelines.tasks.download import DownloadConfig, run_download, run_retry_failed, summary

    cfg = load_config(DownloadConfig, stage_config_path("download", args.config), args.overrides)
    registry = _registry(args.registry)
    try:
        if args.retry_failed:
            manifest = run_retry_failed(cfg, args.retry_failed, name=args.name, registry=registry)
        elif args.source is None:
            raise CommandError("give a SOURCE list, or --retry-failed REF")
        else:
            manifest = run_download(cfg, args.source, name=args.name, registry=registry)
    except MissingFilesystemError as error:  # an s3:// source list or output_folder without s3fs installed
        raise CommandError(str(error)) from None
    _report(summary(manifest), args.json, registry)
    if manifest.counts.get("input") and not manifest.counts.get("ok"):
        failures = ", ".join(f"{reason}: {count}" for reason, count in sorted(manifest.drop_reasons.items()))
        print(f"blip download: error: no image could be downloaded ({failures}); check the network and the source "
              f"URLs. {manifest.ref} records every failure: `blip download --retry-failed {manifest.ref} --name "
              f"{args.name}` tries them again", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from pipelines.config import load_config
    from pipelines.tasks.shard import ShardConfig, run_shard, summary

    cfg = load_config(ShardConfig, stage_config_path("shard", args.config), args.overrides)
    registry = _registry(args.registry)
    manifest = run_shard(cfg, args.ref, name=args.name, registry=registry, eval_sets=args.decontaminate)
    _report(summary(manifest), args.json, registry)
    return 0


def _report(result: dict[str, Any], as_json: bool, registry: Any) -> None:
    if as_json:
        print(json.dumps(result, sort_keys=True))
        return
    print(f"published {result['ref']} (id {result['id']}) in {registry.url}")
    for key, value in result.items():
        if key not in ("ref", "id"):
            print(f"  {key}: {value}")
    print(f"  inspect: blip data show {result['ref']}")
