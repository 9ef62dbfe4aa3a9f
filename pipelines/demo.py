"""`make demo`: BLIP's whole bootstrapping recipe on the embedded demo corpus, on one machine, in minutes.

Runs the `bootstrap` Prefect flow with the `tiny` preset on a temporary local Prefect server (no setup;
`pipelines.prefect_server`) and a private local Ray: generate the noisy web corpus (with ground truth) -> serve it on
127.0.0.1 -> img2dataset download (+ one retry of the failed URLs) -> shard -> pretrain on web data ->
finetune captioner + filter -> CapFilt -> pretrain on bootstrapped data -> finetune + evaluate both ->
report. Ends with the comparison table, what every stage dropped and why, where the artifacts are and how
to browse them. A second run reuses every published version (the registry is the cache).
"""

from __future__ import annotations

import argparse
import sys
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", help="pipeline preset or config file (default tiny)")
    parser.add_argument("--registry", default="./artifacts/registry", help="registry URL (default ./artifacts/registry)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. --set source.demo.n=2000; repeatable")
    args = parser.parse_args(argv)

    from pipelines.logs import show_project_logs
    from pipelines.runtime import apply_environment

    apply_environment()
    show_project_logs()
    from datasets_manifests.registry import Registry
    from pipelines.pipeline_config import load_pipeline

    overrides = [f"registry={args.registry}", *args.overrides]
    cfg = load_pipeline(args.preset, overrides)  # a bad value fails here, before anything runs
    from pipelines.flows.bootstrap import bootstrap
    from pipelines.prefect_server import temporary_server

    started = time.monotonic()
    try:
        with temporary_server():  # no setup; a terminal's Ctrl-C leaves it running until the run has ended
            state = bootstrap(preset=args.preset, overrides=overrides, return_state=True)
    except KeyboardInterrupt as error:
        print(f"\nthe demo stopped{f': {error}' if str(error) else ''}; `make demo` again goes on from where it "
              "stopped (published stages are reused)", file=sys.stderr)  # fmt: skip
        return 130
    if not state.is_completed():
        print(f"\nthe demo flow ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    print_summary(Registry(args.registry), cfg, time.monotonic() - started)
    return 0


def print_summary(registry, cfg, seconds: float) -> None:  # noqa: ANN001 - plain printing
    from datasets_manifests.browser import version_url
    from datasets_manifests.ops import work_entries
    from pipelines.tasks import report

    print(f"\n=== demo finished in {seconds / 60:.1f} min ===\n")
    for what in ("raw", "web", "capfilt"):
        manifest = registry.resolve(cfg.version_name(what), kind="dataset")
        dropped = ", ".join(f"{k} {v}" for k, v in manifest.drop_reasons.items()) or "none"
        print(f"{manifest.ref:<22} {manifest.counts.get('input', manifest.num_samples)} in -> "
              f"{manifest.num_samples} samples; dropped: {dropped}")
    final = registry.resolve(cfg.version_name("report"), kind="evaluation")
    print("\n" + report.render_table(final))
    print(f"artifacts: registry {registry.url} (manifests, shards, per-sample index, models, evaluations)")
    print(f"  list:     blip data --registry {registry.url} ls")
    print(f"  lineage:  blip data --registry {registry.url} lineage {final.ref}")
    print(f"  drops:    blip data --registry {registry.url} samples {cfg.version_name('capfilt')} --where status=dropped")
    print(f"  export:   blip data --registry {registry.url} export {cfg.version_name('capfilt')} --out "
          "bootstrapped.json   (BLIP's released form: [{url, caption}]; --images DIR: {image, caption} for BLIP's "
          "pretrain.py)")  # fmt: skip
    captioner = cfg.version_name("captioner-capfilt")
    if registry.versions("model", captioner):  # absent when CapFilt kept no text
        print(f"  model:    blip data --registry {registry.url} export-model {captioner} --out captioner-hf   "
              "(transformers' BlipForConditionalGeneration.from_pretrained reads it)")  # fmt: skip
    print(f"  browse:   blip data --registry {registry.url} serve   then open "
          f"{version_url(registry.resolve(cfg.version_name('capfilt'), kind='dataset'))}")
    kept = sum(entry.bytes for entry in work_entries(registry))
    print(f"  work:     blip data --registry {registry.url} work   ({kept / 2**20:.0f} MB the runs keep: training "
          "checkpoints, the corpus; --remove-leftovers frees what no rerun needs)")


if __name__ == "__main__":
    sys.exit(main())
