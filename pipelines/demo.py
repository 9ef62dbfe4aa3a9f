"""`make demo`: the data half of the pipeline end to end on one machine, on the synthetic noisy web corpus.

generate corpus (seeded, with ground truth) -> serve it on 127.0.0.1 -> download with img2dataset ->
retry the failed URLs -> shard (dedup, caption cleaning, splits) -> versions in the registry -> summary.
Re-running with the same arguments reuses the corpus and the shard version; the download is keyed on the
source list, whose URLs carry the server's ephemeral port, so it runs again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipelines.config import CONFIG_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="records in the demo corpus (default 5000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--registry", default="./artifacts/registry")
    parser.add_argument("--corpus", type=Path, default=Path("./artifacts/demo-corpus"))
    parser.add_argument("--name", default="demo", help="dataset name (raw version is raw-<name>)")
    args = parser.parse_args(argv)

    from pipelines.runtime import apply_environment

    apply_environment()
    from datasets_manifests.registry import Registry
    from pipelines.config import load_config
    from pipelines.tasks import download, shard
    from pipelines.tasks.demo_corpus import DemoCorpusConfig, serve_corpus, write_corpus, write_source_list

    started = time.perf_counter()
    corpus_cfg = load_config(DemoCorpusConfig, CONFIG_DIR / "demo_corpus.yaml", [f"n={args.n}", f"seed={args.seed}"])
    corpus_dir = args.corpus / f"n{corpus_cfg.n}-seed{corpus_cfg.seed}"
    if not (corpus_dir / "corpus.json").exists():
        info = write_corpus(corpus_cfg, corpus_dir)
        print(f"[1/4] corpus: wrote {info['n']} records to {corpus_dir} ({info['noisy']} noisy texts)")
    else:
        print(f"[1/4] corpus: reusing {corpus_dir}")
    registry = Registry(args.registry)
    download_cfg = load_config(download.DownloadConfig, CONFIG_DIR / "download" / "demo.yaml")
    with serve_corpus(corpus_dir) as base_url:
        source = write_source_list(corpus_dir, base_url, corpus_dir / "source.parquet")
        print(f"[2/4] serving at {base_url}; downloading with img2dataset")
        raw = download.run_download(download_cfg, source, name=f"raw-{args.name}", registry=registry)
        print(f"      {raw.ref}: {raw.counts.get('ok')} ok, failures {raw.drop_reasons}")
        raw = download.run_retry_failed(download_cfg, raw, name=f"raw-{args.name}", registry=registry)
        print(f"[3/4] retried failures -> {raw.ref}: recovered {raw.counts.get('recovered')}, still failing "
              f"{raw.drop_reasons}")
    shard_cfg = load_config(shard.ShardConfig, CONFIG_DIR / "shard" / "demo.yaml")
    dataset = shard.run_shard(shard_cfg, raw, name=args.name, registry=registry)
    print(f"[4/4] sharded -> {dataset.ref}: {dataset.splits}, dropped {dataset.drop_reasons}")
    summary = {
        "corpus": str(corpus_dir), "registry": registry.url,
        "raw": download.summary(raw), "dataset": shard.summary(dataset),
        "seconds": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(summary, indent=2, sort_keys=True))
    print(f"\nnext: blip data show {dataset.ref} --registry {args.registry}")
    print(f"      blip data serve --registry {args.registry}   (browse samples and drop reasons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
