"""The `bootstrap` flow: BLIP's data bootstrapping recipe, one Prefect task per stage.

    download -> shard -> pretrain (web + human pairs) -> finetune captioner (captioning) + filter (retrieval) on
    the clean downstream set -> CapFilt -> pretrain (bootstrapped + human pairs) -> finetune + evaluate both
    models -> report

The two finetunes of a pair, and the two evaluations, are submitted together (`results` waits for both).

With `capfilt_models` set (e.g. BLIP's released captioner and filter) the web pretraining and its finetunes are
skipped: CapFilt runs with that pair, which is evaluated beside the bootstrapped model.

Deployments (infra/prefect.yaml): bootstrap-tiny, bootstrap-14m, bootstrap-129m. Re-running after a crash
reuses every published version (stage cache keys) and resumes inside the interrupted stage.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

from prefect import flow

from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry
from pipelines.flows.stages import results, run_stage
from pipelines.logs import show_project_logs
from pipelines.pipeline_config import PipelineConfig, load_pipeline
from pipelines.progress import TrainingBar
from pipelines.runtime import apply_environment
from pipelines.tasks import (capfilt, demo_source, download, downstream, evaluate, finetune, pretrain, publish_model,
                             report, shard)


@flow(name="bootstrap", log_prints=True)
def bootstrap(preset: str = "tiny", overrides: list[str] | None = None) -> str:
    """Run the whole recipe for a preset (tiny | 14m | 129m | a config path); returns the report's ref."""
    apply_environment()
    show_project_logs()  # a deployment's run starts here, not in the CLI
    cfg = load_pipeline(preset, overrides or [])  # every key/type/range checked before any work starts
    registry = Registry(cfg.registry) if cfg.registry else Registry()
    if cfg.ray_address:
        import os

        os.environ.setdefault("RAY_ADDRESS", cfg.ray_address)

    clean = run_stage("downstream", downstream.publish_downstream, cfg.downstream, registry=registry,
                      output_kind="dataset", output_name=cfg.version_name("downstream"), name=cfg.version_name("downstream"))
    raw = web_data(cfg, registry, eval_sets=(clean,) if cfg.decontaminate else ())
    human = human_pairs(cfg, clean, registry)
    if cfg.capfilt_models.given:  # a captioner and filter you have (BLIP's released ones): no web pretraining
        captioner, filter_ = given_pair(cfg, registry)
        tag = "given"
    else:
        model_web = pretrain_on(cfg, raw, human, "web", registry)
        captioner, filter_ = finetune_pair(cfg, model_web, clean, "web", registry)
        tag = "web"
    boot = run_stage("capfilt", capfilt.run_capfilt, cfg.capfilt, raw, captioner_ref=captioner, filter_ref=filter_,
                     name=cfg.version_name("capfilt"), registry=registry, output_kind="dataset",
                     output_name=cfg.version_name("capfilt"), upstream=[raw, captioner, filter_])
    evaluations = {tag: evaluate_pair(cfg, captioner, filter_, clean, tag, registry)}
    if boot.num_samples:
        model_boot = pretrain_on(cfg, boot, human, "capfilt", registry)
        captioner_b, filter_b = finetune_pair(cfg, model_boot, clean, "capfilt", registry)
        evaluations["capfilt"] = evaluate_pair(cfg, captioner_b, filter_b, clean, "capfilt", registry)
    else:  # nothing to pretrain on: say so in the report instead of failing the run
        print(f"CapFilt kept no text in {boot.ref} (see its drop reasons); the bootstrapped model is not trained")
    final = run_stage("report", report.publish_report, evaluations, boot, name=cfg.version_name("report"),
                      registry=registry, output_kind="evaluation", output_name=cfg.version_name("report"),
                      upstream=[boot, *(m for manifests in evaluations.values() for m in manifests)])
    print(report.render_table(final))
    return final.ref


def web_data(cfg: PipelineConfig, registry: Registry, eval_sets: tuple[Manifest, ...] = ()) -> Manifest:
    """download (img2dataset) -> shard: the noisy web dataset version, without near copies of the `eval_sets`'
    val/test images (`decontaminate`)."""
    name = cfg.version_name("raw")
    if cfg.source.kind == "demo":
        raw = run_stage("download", demo_source.download_demo_corpus, cfg.source.demo, cfg.download, name=name,
                        registry=registry, output_kind="dataset", output_name=name)
    else:
        raw = run_stage("download", download.run_download, cfg.download, cfg.source.path, name=name,
                        registry=registry, output_kind="dataset", output_name=name)
    return run_stage("shard", shard.run_shard, cfg.shard, raw, name=cfg.version_name("web"), registry=registry,
                     eval_sets=eval_sets, output_kind="dataset", output_name=cfg.version_name("web"),
                     upstream=[raw, *eval_sets])


def human_pairs(cfg: PipelineConfig, clean: Manifest, registry: Registry) -> list[Manifest]:
    """The human-annotated pairs both pretrainings add (BLIP: COCO + VG): the clean set's train split and every
    `human_pairs` set (e.g. Visual Genome captions), published here like the clean set."""
    human = [clean] if cfg.pretrain_with_downstream else []
    for pairs_cfg in cfg.human_pairs:
        name = cfg.version_name(f"human-{pairs_cfg.benchmark.replace('_', '-')}")
        human.append(run_stage(f"human-pairs-{pairs_cfg.benchmark}", downstream.publish_downstream, pairs_cfg,
                               registry=registry, output_kind="dataset", output_name=name, name=name))
    return human


def pretrain_on(cfg: PipelineConfig, dataset: Manifest, human: list[Manifest], tag: str,
                registry: Registry) -> Manifest:
    """Pretraining on `dataset` (web or bootstrapped) + the human-annotated pairs, as both of BLIP's pretrainings."""
    name = cfg.version_name(f"pretrain-{tag}")
    # resume_if_present: a flow rerun after a crash mid-pretraining continues that Ray Train run (same cache key).
    with TrainingBar(f"pretrain-{tag}") as progress:  # a worker's log: a line a minute, steps, losses, time left
        return run_stage(f"pretrain-{tag}", pretrain.run_pretrain, replace(cfg.pretrain, output_name=name), dataset,
                         extra_datasets=human, registry=registry, output_kind="model", output_name=name,
                         upstream=[dataset, *human], resume_if_present=True, on_progress=progress)


def finetune_pair(cfg: PipelineConfig, model: Manifest, clean: Manifest, tag: str, registry: Registry) -> tuple[Manifest, Manifest]:
    """The captioner (captioning finetune) and the filter (retrieval finetune) of a pretrained model, at the same
    time: a cluster with room for both runs them side by side; otherwise Ray starts the second's workers when the
    first's free their resources."""
    futures = []
    with contextlib.ExitStack() as bars:
        for role, ft_cfg in (("captioner", cfg.finetune_captioner), ("filter", cfg.finetune_filter)):
            name = cfg.version_name(f"{role}-{tag}")
            progress = bars.enter_context(TrainingBar(f"finetune-{role}-{tag}"))
            futures.append(run_stage(f"finetune-{role}-{tag}", finetune.run_finetune, ft_cfg, init=model,
                                     dataset=clean, name=name, registry=registry, output_kind="model",
                                     output_name=name, upstream=[model, clean], submit=True,
                                     on_progress=progress))  # fmt: skip
        captioner, filter_ = results(futures)
    return captioner, filter_


def given_pair(cfg: PipelineConfig, registry: Registry) -> tuple[Manifest, Manifest]:
    """The captioner and filter of `capfilt_models`: model versions of the registry as they are; any other
    checkpoint published as `<name>-captioner-given` / `<name>-filter-given` (a 'caption' and a 'retrieval' model,
    as the pair the recipe finetunes; the same weights again are the same version)."""
    pair = []
    for role, kind in publish_model.CAPFILT_ROLE_KINDS.items():
        source = getattr(cfg.capfilt_models, role)
        version = publish_model.registry_version(registry, source)
        if version is None:  # a checkpoint: published as one
            name = cfg.version_name(f"{role}-given")
            version = run_stage(f"publish-{role}", publish_model.publish_model, source, name=name, kind=kind,
                                registry=registry, output_kind="model", output_name=name)  # fmt: skip
        pair.append(version)
    return pair[0], pair[1]


def evaluate_pair(cfg: PipelineConfig, captioner: Manifest, filter_: Manifest, clean: Manifest, tag: str,
                  registry: Registry) -> list[Manifest]:
    """The captioner's captioning and the filter's retrieval evaluation, at the same time (as `finetune_pair`)."""
    futures = []
    for task_name, ev_cfg, model in (("caption", cfg.evaluate_caption, captioner),
                                     ("retrieval", cfg.evaluate_retrieval, filter_)):
        name = cfg.version_name(f"eval-{task_name}-{tag}")
        futures.append(run_stage(f"evaluate-{task_name}-{tag}", evaluate.run_evaluate, ev_cfg, model=model,
                                 dataset=clean, name=name, registry=registry, output_kind="evaluation",
                                 output_name=name, upstream=[model, clean], submit=True))  # fmt: skip
    return results(futures)


if __name__ == "__main__":
    import sys

    bootstrap(sys.argv[1] if len(sys.argv) > 1 else "tiny")
