"""Source-list readers: BLIP json, img2dataset csv/tsv/parquet -> (url, caption, source_key)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets_manifests.sources import SourceListError, normalise_source_list, read_source_list, source_key


def test_blip_json_with_caption_lists_and_duplicates(tmp_path):
    path = tmp_path / "ccs.json"
    path.write_text(json.dumps([
        {"url": "http://a/1.jpg", "caption": "a dog"},
        {"image": "http://a/2.jpg", "caption": ["a cat", "a kitten", "a cat"]},  # BLIP #154: one URL, many captions
        {"url": "http://a/1.jpg", "caption": "a dog"},
    ]))
    table, report = read_source_list(path)
    assert table.column("url").to_pylist() == ["http://a/1.jpg", "http://a/2.jpg", "http://a/2.jpg"]
    assert table.column("caption").to_pylist() == ["a dog", "a cat", "a kitten"]
    assert report.records == 3 and report.rows == 3 and report.duplicates == 2
    assert report.top_duplicated_urls == {"http://a/2.jpg": 2}
    assert table.column("source_key").to_pylist()[0] == source_key("http://a/1.jpg", "a dog")
    assert len(set(table.column("source_key").to_pylist())) == 3


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_img2dataset_forms(tmp_path, fmt):
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"URL": ["http://x/1", "http://x/2"], "TEXT": ["one", None]}), path)
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"url{sep}caption\nhttp://x/1{sep}one\nhttp://x/2{sep}\n")
    out = tmp_path / "norm.parquet"
    report = normalise_source_list(path, out)
    table = pq.read_table(out)
    assert table.column_names == ["url", "caption", "source_key"]
    assert table.column("caption").to_pylist() == ["one", ""] and report.rows == 2


def test_malformed_lists_name_file_and_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"url": "http://a", "caption": "x"}, {"caption": "no url"}]))
    with pytest.raises(SourceListError, match=r"bad\.json: record 1 has no 'url'"):
        read_source_list(path)
    path.write_text(json.dumps([{"url": "http://a", "caption": 5}]))
    with pytest.raises(SourceListError, match="record 0 caption"):
        read_source_list(path)
    path.write_text("{not json")
    with pytest.raises(SourceListError, match="not valid JSON"):
        read_source_list(path)
    csv = tmp_path / "x.csv"
    csv.write_text("link,caption\nhttp://a,b\n")
    with pytest.raises(SourceListError, match=r"x\.csv: no url column"):
        read_source_list(csv)
    xml = tmp_path / "list.xml"
    xml.write_text("<urls/>")
    with pytest.raises(SourceListError, match="unknown source list format 'xml'"):
        read_source_list(xml)
