"""Demo corpus: seeded, labelled, served over real HTTP on 127.0.0.1."""

from __future__ import annotations

import urllib.error
import urllib.request

import pyarrow.parquet as pq
import pytest

from pipelines.config import ConfigError, load_config
from pipelines.tasks.demo_corpus import (
    BAD_KINDS, GROUND_TRUTH_COLUMNS, DemoCorpusConfig, read_ground_truth, serve_corpus, write_corpus, write_source_list,
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    write_corpus(DemoCorpusConfig(n=60, seed=3, bad_fraction=0.25, oversized_side=1100), directory)
    return directory


def test_ground_truth_labels(corpus):
    truth = read_ground_truth(corpus).to_pylist()
    assert len(truth) == 60 and set(GROUND_TRUTH_COLUMNS) <= set(truth[0])
    bad = {row["bad_kind"] for row in truth if row["bad_kind"]}
    assert bad == set(BAD_KINDS)  # 15 bad rows: every kind at least once
    good = [row for row in truth if not row["bad_kind"]]
    noisy = [row for row in good if row["is_noisy"]]
    assert 0.15 < len(noisy) / len(good) < 0.7  # noise_fraction 0.4 on ~45 rows
    assert all(row["noise_kind"] for row in noisy) and not any(row["noise_kind"] for row in good if not row["is_noisy"])
    clean = [row for row in good if not row["is_noisy"]]
    assert all(row["colour"] in row["caption"].lower() for row in clean)  # a true text names the colour


def test_seeded_and_deterministic(tmp_path):
    a = write_corpus(DemoCorpusConfig(n=20, seed=7), tmp_path / "a")
    b = write_corpus(DemoCorpusConfig(n=20, seed=7), tmp_path / "b")
    assert a == b
    assert pq.read_table(tmp_path / "a/ground_truth.parquet").equals(pq.read_table(tmp_path / "b/ground_truth.parquet"))
    assert (tmp_path / "a/images/000005.jpg").read_bytes() == (tmp_path / "b/images/000005.jpg").read_bytes()
    c = write_corpus(DemoCorpusConfig(n=20, seed=8), tmp_path / "c")
    assert c != a


def test_source_keys_do_not_depend_on_the_servers_port(corpus, tmp_path):
    """The server's port is ephemeral: sample keys (and so the split and every seeded order) must not follow it."""
    from datasets_manifests.sources import read_source_list

    tables = [read_source_list(write_source_list(corpus, f"http://127.0.0.1:{port}", tmp_path / f"{port}.parquet"))[0]
              for port in (40001, 40002)]
    assert tables[0].column("url") != tables[1].column("url")
    assert tables[0].column("source_key").to_pylist() == tables[1].column("source_key").to_pylist()


def test_server_serves_images_404_and_transient_503(corpus, tmp_path):
    truth = read_ground_truth(corpus).to_pylist()
    with serve_corpus(corpus) as base:
        assert base.startswith("http://127.0.0.1:")
        source = pq.read_table(write_source_list(corpus, base, tmp_path / "src.parquet")).to_pylist()
        assert [s["url"] for s in source] == [f"{base}/{row['path']}" for row in truth]
        good = next(row for row in truth if row["bad_kind"] is None)
        with urllib.request.urlopen(f"{base}/{good['path']}") as response:
            assert response.read()[:2] == b"\xff\xd8"
        missing = next(row for row in truth if row["bad_kind"] == "http_404")
        with pytest.raises(urllib.error.HTTPError, match="404"):
            urllib.request.urlopen(f"{base}/{missing['path']}")
        flaky = next(row for row in truth if row["bad_kind"] == "transient_503")
        with pytest.raises(urllib.error.HTTPError, match="503"):
            urllib.request.urlopen(f"{base}/{flaky['path']}")
        with urllib.request.urlopen(f"{base}/{flaky['path']}") as response:  # second try succeeds
            assert response.status == 200


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="noise_fraction"):
        load_config(DemoCorpusConfig, {"noise_fraction": 1.5})
    with pytest.raises(ConfigError, match="noise_fractoin"):
        load_config(DemoCorpusConfig, {"noise_fractoin": 0.1})


def test_match_ground_truth_ignores_host(corpus):
    from pipelines.tasks.demo_corpus import match_ground_truth

    truth = read_ground_truth(corpus).to_pylist()
    urls = [f"http://127.0.0.1:1234/{row['path']}" for row in truth]
    matched = match_ground_truth(corpus, urls, [row["caption"] for row in truth])
    assert [m["row"] for m in matched] == [row["row"] for row in truth]
    assert match_ground_truth(corpus, ["http://x/images/none.jpg"], ["?"]) == [None]


def test_opted_out_images_are_served_with_the_sites_opt_out_and_leave_the_rest_alone(tmp_path):
    """`opt_out_fraction`: good records whose server says X-Robots-Tag: noai; drawn apart, so the other records
    (and every image) are those of the corpus without opt-outs."""
    plain = write_corpus(DemoCorpusConfig(n=40, seed=5), tmp_path / "plain")
    opted = write_corpus(DemoCorpusConfig(n=40, seed=5, opt_out_fraction=0.2), tmp_path / "opted")
    assert plain["opted_out"] == [] and len(opted["opted_out"]) >= 5
    truth = {row["path"]: row for row in read_ground_truth(tmp_path / "opted").to_pylist()}
    before = {row["path"]: row for row in read_ground_truth(tmp_path / "plain").to_pylist()}
    for path, row in truth.items():
        changed = {key for key in row if row[key] != before[path][key]}
        assert changed == ({"bad_kind", "expected"} if path in opted["opted_out"] else set())
        if path in opted["opted_out"]:
            assert (row["bad_kind"], row["expected"], before[path]["bad_kind"]) == (
                "opted_out", "disallowed_by_robots", None)
    with serve_corpus(tmp_path / "opted") as base:
        with urllib.request.urlopen(f"{base}/{opted['opted_out'][0]}") as response:
            assert response.headers["X-Robots-Tag"] == "noai, noimageai" and response.read()[:2] == b"\xff\xd8"
        good = next(path for path, row in truth.items() if row["bad_kind"] is None)
        with urllib.request.urlopen(f"{base}/{good}") as response:
            assert response.headers["X-Robots-Tag"] is None


def test_the_opt_out_setting_leaves_the_corpus_id_of_the_corpora_before_it():
    """`opt_out_fraction` is ADDED_LATER: at its default the hash (the demo's corpus id and download key) is the
    one from before the setting existed (pinned); set, it is another corpus."""
    from pipelines.config import config_hash

    assert config_hash(DemoCorpusConfig()) == "5076e7d16209b29a"
    assert config_hash(DemoCorpusConfig(opt_out_fraction=0.1)) != "5076e7d16209b29a"
