"""How good was CapFilt? Filter and captioner decisions measured against a synthetic corpus's ground truth.

The demo corpus (pipelines/tasks/demo_corpus.py) knows, for every image, the true scene (shape, colour, ...)
and whether its web text was replaced by noise. With it the stage reports, honestly and only when the truth is
available (config `ground_truth`, or a `ground_truth.parquet` file on a version along the input's lineage):
- filter precision / recall on web texts: is a kept web text really a description of its image, and how many
  true descriptions survived;
- synthetic captions: the share naming the right shape, the right colour (of an object, not the background),
  and both on one object;
- clean fraction before vs after: the share of texts that truly describe their image among the input web texts
  and among the texts the new version keeps (web + synthetic), and for the one `.txt` caption per sample.
A synthetic caption counts as a true description when it names an object of the right shape in the right colour:
a proxy, stated. `evaluate_version` recomputes the numbers of an already published version.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    import pyarrow as pa

    from datasets_manifests.manifest import Manifest
    from datasets_manifests.registry import Registry

GROUND_TRUTH_FILE = "ground_truth.parquet"
# Demo-corpus bad kinds whose web text is no description at all even though it was not "noise".
_NOT_A_DESCRIPTION = ("empty_caption", "absurd_caption")


def check_ground_truth(explicit: str) -> None:
    """A configured ground-truth file (a path or URL) exists: checked before CapFilt runs, not after every shard."""
    from datasets_manifests.filesystems import url_to_fs

    fs, path = url_to_fs(explicit)
    if not fs.isfile(path):
        raise FileNotFoundError(f"capfilt ground_truth {explicit}: no such file")


def find_ground_truth(registry: Registry, dataset: Manifest, explicit: str | None) -> Any | None:
    """The ground-truth file: the configured path, else the first `ground_truth.parquet` along the lineage."""
    if explicit:
        check_ground_truth(explicit)
        return explicit
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


# Words that may sit between a colour and its shape noun ("a small red circle"): demo_corpus sizes and kin.
_SIZE_WORDS = frozenset({"small", "large", "big", "little", "tiny", "huge"})
_TINTS = frozenset({"light", "dark", "pale", "bright"})  # "light blue" is another colour than "blue"


def described_objects(text: str) -> list[tuple[str, str | None]]:
    """(shape, colour or None) for every shape noun of `text`, the colour being the one that qualifies the noun.

    A colour qualifies a noun when it stands right before it (size words may sit between: "a small red circle",
    "three red circles") or right after it as "in <colour>" ("a large circle in red"). A colour anywhere else
    ("on a blue background", "drawn on black", "against a light blue backdrop") describes something else.
    """
    from pipelines.tasks.demo_corpus import COLOURS, SHAPES

    nouns = {**{shape: shape for shape in SHAPES}, **{f"{shape}s": shape for shape in SHAPES}}
    words = re.findall(r"[a-z]+", text.lower())
    objects: list[tuple[str, str | None]] = []
    for position, word in enumerate(words):
        if word not in nouns:
            continue
        before = position - 1
        while before >= 0 and words[before] in _SIZE_WORDS:
            before -= 1
        colour = None
        if before >= 0 and words[before] in COLOURS and not (before > 0 and words[before - 1] in _TINTS):
            colour = words[before]
        elif words[position + 1 : position + 2] == ["in"] and words[position + 2 : position + 3]:
            colour = words[position + 2] if words[position + 2] in COLOURS else None
        objects.append((nouns[word], colour))
    return objects


def names_scene(text: str, shape: str, colour: str) -> tuple[bool, bool, bool]:
    """(names the true shape, names the true colour for an object, names one object with both) of a caption."""
    objects = described_objects(text)
    return (any(s == shape for s, _ in objects), any(c == colour for _, c in objects), (shape, colour) in objects)


def evaluate(registry: Registry, dataset: Manifest, ground_truth: str | None,
             read_tables: Callable[[], tuple[pa.Table, pa.Table]]) -> dict[str, Any] | None:  # fmt: skip
    """Quality numbers of one CapFilt output, or None when no ground truth can be found. `read_tables` gives its
    (texts, index), read only when there is ground truth (the demo corpus; a 129M-row web version has none)."""
    import fsspec
    import pyarrow.parquet as pq

    source = find_ground_truth(registry, dataset, ground_truth)
    if source is None:
        return None
    texts, index = read_tables()
    with fsspec.open(source, "rb") as handle:
        truth_rows = pq.read_table(handle).to_pylist()
    text_rows = texts.select(["key", "text", "source", "kept", "drop_reason"]).to_pylist()
    index_rows = index.select(["key", "url", "caption", "caption_source", "status"]).to_pylist()
    return {"ground_truth": str(source), **measure(truth_rows, text_rows, index_rows)}


def evaluate_version(registry: Registry, ref: str, ground_truth: str | None = None) -> dict[str, Any] | None:
    """The quality numbers of a published CapFilt version, recomputed with this module's current measure.

    For versions published before a change of the measure: nothing is rerun and nothing is written (a manifest
    is never edited); `stats.json`/the manifest keep the figures computed at the time.
    """
    from datasets_manifests.index import TEXTS_FILE, has_layer, read_index, read_texts

    manifest = registry.resolve(ref, kind="dataset")
    if manifest.producer.stage != "capfilt":
        raise ValueError(f"{manifest.ref} was produced by '{manifest.producer.stage}', not by capfilt")
    dataset = registry.resolve(manifest.parents[0], kind="dataset")
    explicit = ground_truth or (manifest.producer.config or {}).get("ground_truth")
    if not has_layer(manifest, TEXTS_FILE):
        raise ValueError(f"{manifest.ref} has no texts.parquet")
    return evaluate(registry, dataset, explicit, lambda: (read_texts(registry, manifest), read_index(registry, manifest)))


def measure(truth_rows: list[dict[str, Any]], text_rows: list[dict[str, Any]],
            index_rows: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The quality numbers from plain rows: ground truth (path, shape, colour, is_noisy, bad_kind), texts.parquet
    (key, text, source, kept, drop_reason) and index.parquet (key, url, caption, caption_source, status)."""
    truth: dict[str, dict[str, Any]] = {}
    for row in truth_rows:
        truth.setdefault(row["path"], row)  # duplicate URLs: the first record owns the URL
    url_of_key = {row["key"]: _url_tail(row["url"]) for row in index_rows}
    web = {"kept_clean": 0, "kept_noisy": 0, "dropped_clean": 0, "dropped_noisy": 0}
    synthetic = {"total": 0, "shape": 0, "colour": 0, "both": 0}
    after = {"kept": 0, "kept_true": 0}
    matched = set()
    for record in text_rows:
        scene = truth.get(url_of_key.get(record["key"]) or "")
        if scene is None or (record["drop_reason"] or "").startswith("decode_error"):
            continue
        matched.add(record["key"])
        if record["source"] == "web":
            true = _web_is_description(scene)
            web[f"{'kept' if record['kept'] else 'dropped'}_{'clean' if true else 'noisy'}"] += 1
        else:
            shape_ok, colour_ok, both = names_scene(record["text"] or "", scene["shape"], scene["colour"])
            synthetic["total"] += 1
            synthetic["shape"] += shape_ok
            synthetic["colour"] += colour_ok
            synthetic["both"] += both
            true = both
        if record["kept"]:
            after["kept"] += 1
            after["kept_true"] += true
    clean_before = web["kept_clean"] + web["dropped_clean"]
    web_total = clean_before + web["kept_noisy"] + web["dropped_noisy"]
    kept_web = web["kept_clean"] + web["kept_noisy"]
    return {
        "samples_matched": len(matched),
        "web_filter": {**web, "precision": _ratio(web["kept_clean"], kept_web),
                       "recall": _ratio(web["kept_clean"], clean_before)},
        "synthetic": {**synthetic, "right_shape": _ratio(synthetic["shape"], synthetic["total"]),
                      "right_colour": _ratio(synthetic["colour"], synthetic["total"]),
                      "right_shape_and_colour": _ratio(synthetic["both"], synthetic["total"])},
        "clean_fraction_before": _ratio(clean_before, web_total),
        "clean_fraction_after": _ratio(after["kept_true"], after["kept"]),
        "training_caption_clean_fraction": _training_caption_quality(index_rows, truth, url_of_key),
        "note": "a synthetic caption counts as clean when it names an object of the true shape in the true colour "
                "(a colour qualifying the shape noun, not the background)",
    }  # fmt: skip


def _web_is_description(scene: dict[str, Any]) -> bool:
    return not scene["is_noisy"] and scene.get("bad_kind") not in _NOT_A_DESCRIPTION


def _training_caption_quality(index_rows: list[dict[str, Any]], truth: dict[str, Any],
                              url_of_key: dict[str, str | None]) -> float | None:  # fmt: skip
    """Share of kept samples whose `.txt` caption truly describes the image."""
    good = total = 0
    for row in index_rows:
        scene = truth.get(url_of_key.get(row["key"]) or "")
        if row["status"] != "ok" or scene is None:
            continue
        total += 1
        if row["caption_source"] == "web":
            good += _web_is_description(scene)
        else:
            good += names_scene(row["caption"] or "", scene["shape"], scene["colour"])[2]
    return _ratio(good, total)


def _ratio(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None
