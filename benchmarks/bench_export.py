"""`blip data export` of a CapFilt version's kept texts: written a batch at a time vs a JSON object at a time.

Publishes (to a temporary registry) a CapFilt-like version of `--rows` samples with three texts each (web + two
synthetic, about half kept; `bench_browser_index.build`), then exports its kept texts as BLIP's released files
(`--format blip-json`, a JSON list of {url, caption}), as JSON lines, and as {image, caption} entries naming the
files `--images` writes. Ours (`export.export_texts`): each batch of texts joined to its samples' URLs and shards by
Arrow (`index_in` on a window of index rows), filtered by Arrow, each line built from strings escaped by the json
module's C encoder. The obvious baseline, side by side on the same version: the loop the export was before — one
dict a text, joined to the index row by row, written by `json.dumps` (and a `Path` built and resolved a text for
the image entries). Both write the same bytes (checked by sha256). Prints one JSON object.
`python benchmarks/bench_export.py` (~1 min at the default 300k rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_browser_index import build  # noqa: E402  (benchmarks/ is the script's directory)
from datasets_manifests.export import export_texts  # noqa: E402
from datasets_manifests.index import INDEX_FILE, TEXTS_FILE, iter_registry_parquet  # noqa: E402
from datasets_manifests.registry import Registry  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300_000, help="samples of the version (3 texts each)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each side, alternating; the fastest is kept")
    return parser.parse_args(argv)


def row_at_a_time(registry: Registry, manifest: Any, out: Path, fmt: str, images: Path | None) -> int:
    """The export before: a dict a kept text, the index walked a row at a time beside the texts, `json.dumps`."""
    def index_rows() -> Iterator[tuple[str, str, str]]:
        for batch in iter_registry_parquet(registry, registry.path_of(manifest, INDEX_FILE), ["key", "url", "shard"]):
            yield from zip(*(batch.column(name).to_pylist() for name in ("key", "url", "shard")))

    written, first, key, url, shard, rows = 0, True, None, None, None, index_rows()
    with open(out, "w", encoding="utf-8") as handle:
        handle.write("[\n" if fmt == "blip-json" else "")
        texts = iter_registry_parquet(registry, registry.path_of(manifest, TEXTS_FILE),
                                      ["key", "text", "source", "itm_score", "kept"])  # fmt: skip
        for batch in texts:
            for row in batch.to_pylist():
                while key != row["key"]:
                    key, url, shard = next(rows)
                if not row["kept"]:
                    continue
                score = row["itm_score"]
                item = {"key": key, "url": url, "caption": row["text"], "source": row["source"],
                        "itm_score": None if score is None else round(float(score), 6)}  # fmt: skip
                if images is not None:
                    item["image"] = str(images.resolve() / Path(shard).name.removesuffix(".tar") / f"{key}.jpg")
                if fmt == "blip-json":
                    where = {"image": item["image"]} if images is not None else {"url": url}
                    handle.write(("" if first else ",\n") + json.dumps({**where, "caption": item["caption"]},
                                                                       ensure_ascii=False))  # fmt: skip
                else:
                    handle.write(json.dumps(item, ensure_ascii=False) + "\n")
                first = False
                written += 1
        handle.write("\n]\n" if fmt == "blip-json" else "")
    return written


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        root = Path(tmp) / "registry"
        build(root, args.rows)
        registry = Registry(str(root))
        manifest = registry.resolve("big@v1")
        images = Path(tmp) / "images"
        cases: dict[str, Any] = {}
        for label, fmt, folder in (("blip-json", "blip-json", None), ("jsonl", "jsonl", None),
                                   ("blip-json --images", "blip-json", images)):  # fmt: skip
            ours, baseline = Path(tmp) / "ours", Path(tmp) / "baseline"
            times: dict[str, list[float]] = {"ours": [], "baseline": []}
            texts = 0
            for _ in range(args.runs):
                start = time.perf_counter()
                texts = sum(export_texts(registry, manifest, ours, fmt, images=folder).values())
                times["ours"].append(time.perf_counter() - start)
                start = time.perf_counter()
                row_at_a_time(registry, manifest, baseline, fmt, folder)
                times["baseline"].append(time.perf_counter() - start)
            digest = {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in (ours, baseline)}
            best = {side: min(values) for side, values in times.items()}
            cases[label] = {
                "texts": texts, "bytes": ours.stat().st_size, "seconds": {k: round(v, 3) for k, v in best.items()},
                "texts_per_s": {side: round(texts / seconds) for side, seconds in best.items()},
                "speedup": round(best["baseline"] / best["ours"], 2), "same_bytes": len(set(digest.values())) == 1,
            }  # fmt: skip
    result = {"benchmark": "bench_export", "rows": args.rows, "texts_per_row": 3, "runs": args.runs, "cases": cases}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
