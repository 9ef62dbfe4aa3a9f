"""Training-read throughput of our shards: webdataset + decode + BLIP train transforms vs raw tar iteration,
and the walk of a rank's raw stream by our tar reader vs Python's tarfile side by side.

One process (= per core). The transform is blip_models.processing.train_transform (RandomResizedCrop bicubic,
flip, RandomAugment(2, 5), CLIP normalisation), as BLIP pretraining reads its data. The baseline is plain
tar iteration (`pipelines.tasks.webdata.iter_tar`: bytes only, no decode), the ceiling of any reader.
The walk: every sample of a stream read, `train_data.iter_tar_samples` (pipelines/tasks/tar_reader.py) against
the same loop on `tarfile` in stream mode (the reader before it). `walk_cpu_vs_decode_8_workers`: that walk's CPU
time as a fraction of a worker's decoding share with 8 workers, which is what each DataLoader worker of a training
rank paid when every worker read the rank's whole stream; each now reads only its own samples' data and walks
the other headers (bench_rank_stream.py), so this is the bound.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Callable


def _make_shards(root: Path, n: int, size: int, per_shard: int) -> list[str]:
    from pipelines.tasks.demo_corpus import random_scene, render, true_caption
    from pipelines.tasks.webdata import TarShardWriter

    rng = random.Random(0)
    with TarShardWriter(root, "train", per_shard) as writer:
        for i in range(n):
            scene = random_scene(rng)
            buffer = io.BytesIO()
            render(scene, size).save(buffer, format="JPEG", quality=90)
            caption = true_caption(scene)
            writer.write(f"s{i:07d}", {"jpg": buffer.getvalue(), "txt": caption.encode(),
                                       "json": json.dumps({"key": f"s{i:07d}"}).encode()})
    return [str(root / path) for path, _ in writer.shards]


def walk(urls: list[str], tar_reader: bool) -> int:
    """Samples of the stream, every member's bytes read (what a training worker does before choosing its own)."""
    import tarfile

    from pipelines.tasks.train_data import iter_tar_samples
    from pipelines.tasks.webdata import split_key

    if tar_reader:
        return sum(1 for url in urls for _ in iter_tar_samples(url))
    count = 0
    for url in urls:
        current = None
        with open(url, "rb") as handle, tarfile.open(fileobj=handle, mode="r|*") as tar:
            for member in tar:
                if member.isfile():
                    key = split_key(member.name)[0]
                    count += key != current
                    current = key
                    tar.extractfile(member).read()
    return count


def best_rate(run: Callable[[], int], repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        count = run()
        best = max(best, count / (time.perf_counter() - started))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--source-size", type=int, default=384, help="stored image side")
    parser.add_argument("--image-size", type=int, default=224, help="training crop (BLIP pretraining: 224)")
    args = parser.parse_args()

    import torch
    import webdataset as wds

    from blip_models.processing import pre_caption, train_transform
    from pipelines.tasks.webdata import iter_tar

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-read-") as tmp:
        urls = _make_shards(Path(tmp), args.n, args.source_size, 250)
        started = time.perf_counter()
        raw_count = 0
        for url in urls:
            with open(url, "rb") as handle:
                raw_count += sum(1 for _ in iter_tar(handle))
        raw_s = time.perf_counter() - started

        transform = train_transform(args.image_size, min_scale=0.2, augment_seed=0)
        dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil")
                   .to_tuple("jpg", "txt").map_tuple(transform, lambda text: pre_caption(text, 30)))
        started = time.perf_counter()
        ours_count = 0
        for image, _caption in dataset:
            assert image.shape == (3, args.image_size, args.image_size)
            ours_count += 1
        ours_s = time.perf_counter() - started
        walk_ours, walk_tarfile = best_rate(lambda: walk(urls, True)), best_rate(lambda: walk(urls, False))
    ours_rate, raw_rate = ours_count / ours_s, raw_count / raw_s
    print(json.dumps({
        "benchmark": "read", "samples": args.n, "stored_side": args.source_size, "crop": args.image_size,
        "transform": "blip_models.processing.train_transform", "processes": 1,
        "train_read_samples_per_s_per_core": round(ours_rate, 1), "raw_tar_samples_per_s": round(raw_rate, 1),
        "ratio_train_read_over_raw_tar": round(ours_rate / raw_rate, 4),
        "walk_samples_per_s": round(walk_ours, 1), "walk_tarfile_samples_per_s": round(walk_tarfile, 1),
        "walk_ratio_vs_tarfile": round(walk_ours / walk_tarfile, 2),
        "walk_cpu_vs_decode_8_workers": round(8 * ours_rate / walk_ours, 3),
        "walk_cpu_vs_decode_8_workers_tarfile": round(8 * ours_rate / walk_tarfile, 3),
    }))


if __name__ == "__main__":
    main()
