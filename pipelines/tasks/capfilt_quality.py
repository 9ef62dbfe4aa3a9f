"""How good was CapFilt? Filter and captioner decisions measured against a synthetic corpus's ground truth.

The demo corpus (pipelines/tasks/demo_corpus.py) knows, for every image, the true scene (shape, colour, ...)
and whether its web text was replaced by noise. With it the stage reports, honestly and only when the truth is
available (config `ground_truth`, or a `ground_truth.parquet` file on a version along the input's lineage):
- filter precision / recall on web texts: is a kept web text really a description of its image, and how many
  true descriptions survived;
- synthetic captions: the share naming the right shape, the right colour, and both;
- clean fraction before vs after: the share of texts that truly describe their image among the input web texts
  and among the texts the new version keeps (web + synthetic), and for the one `.txt` caption per sample.
A synthetic caption counts as a true description when it names the right shape and colour: a proxy, stated.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyarrow as pa

    from datasets_manifests.manifest import Manifest
    from datasets_manifests.registry import Registry

GROUND_TRUTH_FILE = "ground_truth.parquet"
# Demo-corpus bad kinds whose web text is no description at all even though it was not "noise".
_NOT_A_DESCRIPTION = ("empty_caption", "absurd_caption")


def find_ground_truth(registry: Registry, dataset: Manifest, explicit: str | None) -> Any | None:
    """The ground-truth file: the configured path, else the first `ground_truth.parquet` along the lineage."""
    if explicit:
        path = Path(explicit)
        if not path.exists():
            raise FileNotFoundError(f"capfilt ground_truth {explicit}: no such file")
        return str(path)
    seen: set[str] = set()
    queue = [dataset]
    while queue:
        manifest = queue.pop(0)
        if manifest.id in seen:
            continue
        seen.add(manifest.id)
        for entry in manifest.files:
            if entry.path.rsplit("/", 1)[-1] == GROUND_TRUTH_FILE:
                return registry.url_of(manifest, entry.path)
        hint = manifest.metadata.get("ground_truth") if isinstance(manifest.metadata, dict) else None
        if isinstance(hint, str) and Path(hint).exists():
            return hint
        for ref in manifest.parents:
            try:
                queue.append(registry.resolve(ref))
            except Exception:  # noqa: BLE001 - a parent outside this registry ends that branch of the walk
                continue
    return None


def _url_tail(url: str | None) -> str | None:
    # Corpus paths look like "images/000123.jpg"; URLs are "<base>/images/000123.jpg".
    return "/".join(url.rstrip("/").split("/")[-2:]) if url else None


def names_scene(text: str, shape: str, colour: str) -> tuple[bool, bool]:
    words = set(text.lower().replace(",", " ").split())
    return (shape in words or f"{shape}s" in words), colour in words


def evaluate(registry: Registry, dataset: Manifest, config: Any, texts: pa.Table, index: pa.Table) -> dict[str, Any] | None:
    """Quality numbers of one CapFilt output, or None when no ground truth can be found."""
    import pyarrow.parquet as pq

    source = find_ground_truth(registry, dataset, getattr(config, "ground_truth", None))
    if source is None:
        return None
    import fsspec

    with fsspec.open(source, "rb") as handle:
        truth_rows = pq.read_table(handle).to_pylist()
    truth = {}
    for row in truth_rows:
        truth.setdefault(row["path"], row)  # duplicate URLs: the first record owns the URL
    url_of_key = {r["key"]: _url_tail(r["url"]) for r in index.select(["key", "url"]).to_pylist()}
    web = {"kept_clean": 0, "kept_noisy": 0, "dropped_clean": 0, "dropped_noisy": 0}
    synthetic = {"total": 0, "shape": 0, "colour": 0, "both": 0}
    after = {"kept": 0, "kept_true": 0}
    matched = set()
    for record in texts.select(["key", "text", "source", "kept", "drop_reason"]).to_pylist():
        scene = truth.get(url_of_key.get(record["key"]) or "")
        if scene is None or (record["drop_reason"] or "").startswith("decode_error"):
            continue
        matched.add(record["key"])
        if record["source"] == "web":
            clean = not scene["is_noisy"] and scene.get("bad_kind") not in _NOT_A_DESCRIPTION
            web[f"{'kept' if record['kept'] else 'dropped'}_{'clean' if clean else 'noisy'}"] += 1
            true = clean
        else:
            shape_ok, colour_ok = names_scene(record["text"], scene["shape"], scene["colour"])
            synthetic["total"] += 1
            synthetic["shape"] += shape_ok
            synthetic["colour"] += colour_ok
            synthetic["both"] += shape_ok and colour_ok
            true = shape_ok and colour_ok
        if record["kept"]:
            after["kept"] += 1
            after["kept_true"] += true
    train = _training_caption_quality(index, truth, url_of_key)
    clean_before = web["kept_clean"] + web["dropped_clean"]
    web_total = clean_before + web["kept_noisy"] + web["dropped_noisy"]
    kept_web = web["kept_clean"] + web["kept_noisy"]
    return {
        "ground_truth": str(source),
        "samples_matched": len(matched),
        "web_filter": {**web, "precision": _ratio(web["kept_clean"], kept_web),
                       "recall": _ratio(web["kept_clean"], clean_before)},
        "synthetic": {**synthetic, "right_shape": _ratio(synthetic["shape"], synthetic["total"]),
                      "right_colour": _ratio(synthetic["colour"], synthetic["total"]),
                      "right_shape_and_colour": _ratio(synthetic["both"], synthetic["total"])},
        "clean_fraction_before": _ratio(clean_before, web_total),
        "clean_fraction_after": _ratio(after["kept_true"], after["kept"]),
        "training_caption_clean_fraction": train,
        "note": "a synthetic caption counts as clean when it names the true shape and colour",
    }  # fmt: skip


def _training_caption_quality(index: pa.Table, truth: dict[str, Any], url_of_key: dict[str, str | None]) -> float | None:
    """Share of kept samples whose `.txt` caption truly describes the image."""
    good = total = 0
    for row in index.select(["key", "caption", "caption_source", "status"]).to_pylist():
        scene = truth.get(url_of_key.get(row["key"]) or "")
        if row["status"] != "ok" or scene is None:
            continue
        total += 1
        if row["caption_source"] == "web":
            good += not scene["is_noisy"] and scene.get("bad_kind") not in _NOT_A_DESCRIPTION
        else:
            good += all(names_scene(row["caption"] or "", scene["shape"], scene["colour"]))
    return _ratio(good, total)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
