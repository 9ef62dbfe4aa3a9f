"""The download stage on the embedded demo corpus: generate (once) -> serve on 127.0.0.1 -> img2dataset ->
retry the failed URLs once (the corpus has transient 503s, as the web does) -> raw dataset version.

The corpus directory and the download's cache key derive from the corpus config, not from the source list,
whose URLs carry the server's ephemeral port: a re-run of the flow reuses the published version, and a
crashed download resumes in the same work directory. The ground truth is published with the raw version,
so CapFilt can measure itself against it along the lineage.
"""

from __future__ import annotations

from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import Registry
from pipelines.config import config_hash
from pipelines.tasks.demo_corpus import DemoCorpusConfig, serve_corpus, write_corpus, write_source_list
from pipelines.tasks.download import DownloadConfig, run_download, run_retry_failed


def download_demo_corpus(corpus_cfg: DemoCorpusConfig, download_cfg: DownloadConfig, *, name: str,
                         registry: Registry) -> Manifest:
    corpus_id = f"demo-corpus-{config_hash(corpus_cfg)}"
    corpus_dir = registry.work_dir(corpus_id)
    if not (corpus_dir / "corpus.json").exists():
        write_corpus(corpus_cfg, corpus_dir)
    with serve_corpus(corpus_dir) as base_url:
        source = write_source_list(corpus_dir, base_url, corpus_dir / "source.parquet")
        raw = run_download(download_cfg, source, name=name, registry=registry, source_id=corpus_id,
                           extra_files={"ground_truth.parquet": corpus_dir / "ground_truth.parquet"})
        return run_retry_failed(download_cfg, raw, name=name, registry=registry)
