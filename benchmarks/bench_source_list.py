"""Source-list normalisation at dataset scale: streamed in chunks with digests vs read whole into Python.

The download stage first normalises its source list (BLIP's annotation JSON or an img2dataset table) into
(url, caption, source_key) rows without exact duplicates. BLIP's LAION-115M list is one JSON array of 115M
records: read whole (`json.loads`, Python lists and a set of (url, caption) pairs, the design before, rebuilt
here as the baseline) it needs several hundred bytes per row. `normalise_source_list` now decodes the array a
record at a time, stages chunks in an Arrow file and keeps 128-bit digests (~50 bytes per row).

Both sides run in fresh processes on the same generated BLIP-style JSON (`--records` records, a tenth with
caption lists, ~2 % repeated pairs); reports wall time and peak anonymous memory (RssAnon, sampled) above the
process's start, and checks that both write the same rows and report. Prints one JSON object.
`python benchmarks/bench_source_list.py` (~1 min on 2 cores at 3M records, 350 MiB of JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peak_memory import benchmark_main, measure_side, run_sides  # noqa: E402  (benchmarks/ is the script's directory)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=3_000_000)
    parser.add_argument("--side", choices=["streamed", "whole"], help=argparse.SUPPRESS)  # one side, in a child
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def write_list(path: Path, count: int) -> None:
    rng = random.Random(0)
    words = ("a", "red", "square", "photo", "of", "the", "blue", "circle", "on", "grass", "with", "two")
    with open(path, "w") as out:
        out.write("[")
        for row in range(count):
            url = f"http://images.example.com/p/{rng.randrange(row + 1) if rng.random() < 0.02 else row}/photo.jpg"
            caption = " ".join(rng.choice(words) for _ in range(10))
            if rng.random() < 0.02:
                caption = "a red square photo"  # with the repeated URLs above, some exact duplicates
            value = [caption, caption + " again"] if rng.random() < 0.1 else caption
            out.write(("," if row else "") + json.dumps({"url": url, "caption": value}))
        out.write("]")


def normalise_whole(path: Path, out: Path) -> dict[str, Any]:
    """The design before: the whole list in Python, a set of pairs, one write."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from datasets_manifests.sources import SOURCE_SCHEMA, source_key

    data = json.loads(path.read_text())
    urls, captions = [], []
    for record in data:
        caption = record["caption"]
        for text in caption if isinstance(caption, list) else [caption]:
            urls.append(record.get("url", record.get("image")))
            captions.append(text)
    seen: set[tuple[str, str]] = set()
    per_url: dict[str, int] = {}
    out_urls, out_captions, keys = [], [], []
    duplicates = 0
    for url, caption in zip(urls, captions):
        if (url, caption) in seen:
            duplicates += 1
            continue
        seen.add((url, caption))
        per_url[url] = per_url.get(url, 0) + 1
        out_urls.append(url)
        out_captions.append(caption)
        keys.append(source_key(url, caption))
    worst = sorted(per_url.items(), key=lambda item: -item[1])[:5]
    table = pa.table([pa.array(out_urls, pa.string()), pa.array(out_captions, pa.string()), pa.array(keys, pa.string())],
                     schema=SOURCE_SCHEMA)  # fmt: skip
    pq.write_table(table, out)
    return {"records": len(data), "rows": len(out_urls), "duplicates": duplicates,
            "top_duplicated_urls": {url: count for url, count in worst if count > 1}}  # fmt: skip


def child(args: argparse.Namespace) -> None:
    from datasets_manifests.sources import normalise_source_list

    directory = Path(args.dir)

    def work() -> dict[str, Any]:
        if args.side == "streamed":
            report = normalise_source_list(directory / "list.json", directory / "streamed.parquet").to_dict()
            return {"report": {k: report[k] for k in ("records", "rows", "duplicates", "top_duplicated_urls")}}
        return {"report": normalise_whole(directory / "list.json", directory / "whole.parquet")}

    measure_side(directory, args.side, work)


def report(args: argparse.Namespace) -> dict[str, Any]:
    """Run the sides in fresh processes and print the comparison."""
    with tempfile.TemporaryDirectory(prefix="bench-source-list-") as tmp:
        directory = Path(tmp)
        write_list(directory / "list.json", args.records)
        list_mib = (directory / "list.json").stat().st_size / 2**20
        results = run_sides(__file__, ("whole", "streamed"), directory, "--records", str(args.records))
        import pyarrow.parquet as pq

        # The same rows; the row groups differ past 1M rows (the streamed side writes a chunk at a time).
        same_rows = pq.read_table(directory / "whole.parquet").equals(pq.read_table(directory / "streamed.parquet"))
    rows = results["streamed"]["report"]["rows"]
    per_row = {side: round(results[side]["peak_mib"] * 2**20 / rows) for side in results}
    report = {
        "benchmark": "source_list", "host_cpus": os.cpu_count(), "records": args.records, "rows": rows,
        "list_mib": round(list_mib, 1), "same_rows": same_rows,
        "same_report": results["whole"]["report"] == results["streamed"]["report"],
        **{side: {"wall_s": round(results[side]["wall_s"], 2), "peak_mib": round(results[side]["peak_mib"], 1),
                  "bytes_per_row": per_row[side], "rows_per_s": round(rows / results[side]["wall_s"])}
           for side in ("streamed", "whole")},
        "memory_ratio": round(results["whole"]["peak_mib"] / results["streamed"]["peak_mib"], 1),
        "time_ratio": round(results["whole"]["wall_s"] / results["streamed"]["wall_s"], 2),
        # Peak per row at this size x 127M rows: the streamed side's one-chunk constant makes it an upper bound.
        "at_127m_gib": {side: round(per_row[side] * 127e6 / 2**30) for side in per_row},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    return report


main = benchmark_main(parse_args, child, report)

if __name__ == "__main__":
    main()
