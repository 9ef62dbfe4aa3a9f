"""The last stage of the recipe: compare the model pretrained on raw web data with the one pretrained on
the CapFilt-bootstrapped data (BLIP Table 1 in miniature), next to what CapFilt kept and how clean it was.

Input: the evaluation versions of both models (metrics in `metadata["metrics"]`) and the bootstrapped
dataset version (CapFilt stats). Output: an evaluation version `report.json` + `report.md`.
"""

from __future__ import annotations

import json
from typing import Any

from datasets_manifests.manifest import Manifest, Producer, cache_key
from datasets_manifests.registry import Registry, now_utc

STAGE = "report"
# Metrics shown in the comparison, in order (others stay in report.json).
HEADLINE_METRICS = ("txt_r1", "img_r1", "r_mean", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")


CAPFILT_MEASURES = ("samples_in", "samples_kept", "web_texts_kept", "synthetic_texts_kept", "filter_precision_web",
                    "filter_recall_web", "synthetic_right_shape_and_colour", "clean_fraction_before",
                    "clean_fraction_after")


def _metrics(evaluation: Manifest) -> dict[str, Any]:
    return dict(evaluation.metadata.get("metrics") or {})


def capfilt_summary(bootstrapped: Manifest) -> dict[str, Any]:
    counts = bootstrapped.counts
    quality = bootstrapped.stats.get("capfilt", {}).get("quality") or {}
    web_filter = quality.get("web_filter") or {}
    synthetic = quality.get("synthetic") or {}

    def fraction(kept: str, total: str) -> float | None:
        return round(counts[kept] / counts[total], 4) if counts.get(total) else None

    return {
        "samples_in": counts.get("input"),
        "samples_kept": counts.get("kept"),
        "web_texts_kept": fraction("texts_web_kept", "texts_web"),
        "synthetic_texts_kept": fraction("texts_synthetic_kept", "texts_synthetic"),
        "filter_precision_web": web_filter.get("precision"),
        "filter_recall_web": web_filter.get("recall"),
        "synthetic_right_shape_and_colour": synthetic.get("right_shape_and_colour"),
        "clean_fraction_before": quality.get("clean_fraction_before"),
        "clean_fraction_after": quality.get("clean_fraction_after"),
    }


def build_report(evaluations: dict[str, list[Manifest]], bootstrapped: Manifest) -> dict[str, Any]:
    models: dict[str, dict[str, Any]] = {}
    for tag, manifests in evaluations.items():
        merged: dict[str, Any] = {}
        for evaluation in manifests:
            merged.update({k: v for k, v in _metrics(evaluation).items() if isinstance(v, (int, float)) or v is None})
        models[tag] = {"evaluations": [m.ref for m in manifests], "metrics": merged}
    return {"capfilt": {"dataset": bootstrapped.ref, **capfilt_summary(bootstrapped)}, "models": models}


def render_markdown(report: dict[str, Any]) -> str:
    tags = sorted(report["models"], key=lambda tag: (tag not in ("web", "given"), tag))  # the CapFilt pair's first
    names = [m for m in HEADLINE_METRICS if any(m in report["models"][t]["metrics"] for t in tags)]
    names += sorted({k for t in tags for k in report["models"][t]["metrics"]} - set(names))
    first = "the given captioner and filter" if "given" in tags else "raw web data"
    lines = [f"## Downstream metrics: {first} vs CapFilt-bootstrapped data", "",
             "| metric | " + " | ".join(tags) + " |", "|---|" + "---|" * len(tags)]
    for name in names:
        cells = [_fmt(report["models"][t]["metrics"].get(name)) for t in tags]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"## CapFilt ({report['capfilt']['dataset']})", "", "| measure | value |", "|---|---|"]
    lines += [f"| {key} | {_fmt(report['capfilt'].get(key))} |" for key in CAPFILT_MEASURES]
    if "capfilt" not in report["models"]:
        lines += ["", "CapFilt kept no text, so no model was pretrained on bootstrapped data (see the dataset's "
                  "drop reasons and ITM score histograms)."]
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def publish_report(evaluations: dict[str, list[Manifest]], bootstrapped: Manifest, *, name: str,
                   registry: Registry) -> Manifest:
    parents = [bootstrapped] + [m for manifests in evaluations.values() for m in manifests]
    key = cache_key(STAGE, [p.id for p in parents], "report-v1")
    cached = registry.find_cached("evaluation", name, key)
    if cached is not None:
        return cached
    report = build_report(evaluations, bootstrapped)
    work = registry.work_dir(key)
    (work / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (work / "report.md").write_text(render_markdown(report))
    producer = Producer(stage=STAGE, config={"tags": list(evaluations)}, config_hash="report-v1", cache_key=key,
                        started_at=now_utc())
    return registry.publish(
        kind="evaluation", name=name, staging_dir=work, producer=producer, parents=parents,
        files=[{"path": "report.json", "role": "metrics"}, {"path": "report.md", "role": "other"}],
        metadata={"task": "report", "report": report},
    )


def render_table(manifest: Manifest) -> str:
    """The report as terminal text (the markdown table reads fine in a terminal)."""
    return render_markdown(manifest.metadata["report"])
