"""Download throughput: our download stage vs the plain `img2dataset` CLI, same list, same settings, side by side.

Both fetch the demo corpus from a server on 127.0.0.1, so the number measures the tools (decode, resize,
re-encode, write), not the network. Ours also normalises the source list, indexes the shards (offsets, sha256)
and publishes a version. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    from datasets_manifests.registry import Registry
    from pipelines.config import load_config
    from pipelines.tasks.demo_corpus import DemoCorpusConfig, serve_corpus, write_corpus, write_source_list
    from pipelines.tasks.download import DownloadConfig, run_download

    settings = {"processes": args.processes, "threads": args.threads, "samples_per_shard": 200, "image_size": 96,
                "resize_mode": "keep_ratio", "timeout": 10}
    cfg = load_config(DownloadConfig, settings)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        root = Path(tmp)
        write_corpus(DemoCorpusConfig(n=args.n, bad_fraction=0.0, seed=1), root / "corpus")
        with serve_corpus(root / "corpus") as base:
            source = write_source_list(root / "corpus", base, root / "source.parquet")
            started = time.perf_counter()
            manifest = run_download(cfg, source, name="bench", registry=Registry(root / "registry"))
            ours_s = time.perf_counter() - started
            command = [
                str(Path(sys.executable).parent / "img2dataset"), f"--url_list={source}", "--input_format=parquet",
                "--url_col=url", "--caption_col=caption", "--output_format=webdataset",
                f"--output_folder={root / 'plain'}", f"--processes_count={args.processes}",
                f"--thread_count={args.threads}", "--number_sample_per_shard=200", "--image_size=96",
                "--resize_mode=keep_ratio", "--resize_only_if_bigger=True", "--timeout=10", "--enable_wandb=False",
                "--extract_exif=False", "--max_aspect_ratio=10",
            ]
            started = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True, env={"NO_ALBUMENTATIONS_UPDATE": "1", **os.environ})
            plain_s = time.perf_counter() - started
        plain_ok = sum(json.loads(p.read_text())["successes"] for p in (root / "plain").glob("*_stats.json"))
    ours_rate = manifest.counts["ok"] / ours_s
    plain_rate = plain_ok / plain_s
    print(json.dumps({
        "benchmark": "download", "images": args.n, "processes": args.processes, "threads": args.threads,
        "ours_ok": manifest.counts["ok"], "img2dataset_ok": plain_ok,
        "ours_seconds": round(ours_s, 2), "img2dataset_seconds": round(plain_s, 2),
        "ours_images_per_s": round(ours_rate, 1), "img2dataset_images_per_s": round(plain_rate, 1),
        "ratio_ours_over_img2dataset": round(ours_rate / plain_rate, 3),
        "note": "both include process start-up (spawned pool imports); server on 127.0.0.1",
    }))


if __name__ == "__main__":
    main()
