"""Source-list readers: BLIP json, img2dataset csv/tsv/parquet -> (url, caption, source_key)."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets_manifests.sources import (
    MissingFilesystemError, SourceListError, missing_filesystem_message, normalise_source_list, read_source_list,
    source_key, source_list_sha256,
)


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


def test_a_source_key_column_is_the_lists_own_stable_ids(tmp_path):
    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg"], "caption": ["a", "b"],
                             "source_key": ["row-0", "row_1"]}), path)
    table, _ = read_source_list(path)
    assert table.column("source_key").to_pylist() == ["row-0", "row_1"]  # not the hash of the (changing) URL
    for keys, problem in ((["a.b", "c"], "row 0 has source_key 'a.b'"), (["x", "x"], "repeats 'x'")):
        pq.write_table(pa.table({"url": ["http://h/1", "http://h/2"], "caption": ["a", "b"], "source_key": keys}), path)
        with pytest.raises(SourceListError, match=problem):
            read_source_list(path)


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


@pytest.mark.parametrize("fmt", ["json", "csv", "parquet"])
def test_source_lists_on_fsspec_urls(tmp_path, fmt):
    # Presets point source.path at s3://...; the same code path is exercised with fsspec's memory://.
    url = f"memory://sources-{uuid.uuid4().hex}/list.{fmt}"
    fs, path = fsspec.core.url_to_fs(url)
    records = [{"url": "http://a/1.jpg", "caption": "a dog"}, {"url": "http://a/2.jpg", "caption": "a cat"}]
    if fmt == "json":
        fs.pipe(path, json.dumps(records).encode())
    elif fmt == "csv":
        fs.pipe(path, b"url,caption\nhttp://a/1.jpg,a dog\nhttp://a/2.jpg,a cat\n")
    else:
        buffer = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(records), buffer)
        fs.pipe(path, buffer.getvalue())
    report = normalise_source_list(url, tmp_path / "out.parquet")
    assert report.path == url and report.rows == 2
    assert pq.read_table(tmp_path / "out.parquet").column("caption").to_pylist() == ["a dog", "a cat"]
    assert source_list_sha256(url) == hashlib.sha256(fs.cat(path)).hexdigest()
    with pytest.raises(FileNotFoundError, match="source list not found"):
        read_source_list(url + ".missing.json")


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_missing_filesystem_names_the_extra():
    with pytest.raises(MissingFilesystemError, match=r"pip install 'blip-bootstrap\[s3\]'"):
        read_source_list("s3://bucket/list.parquet")
    assert "blip-bootstrap[gcs]" in missing_filesystem_message("gs://b/x", ImportError("Install gcsfs"))


@pytest.mark.parametrize("read_chars", [1, 3, 7, 4096])
def test_json_array_is_decoded_one_record_at_a_time(read_chars):
    # BLIP's LAION-115M annotation file is one JSON array: it is decoded record by record from a text stream,
    # whatever the read size cuts through (strings with ']' and ',', nested lists, numbers, multi-byte text).
    from datasets_manifests.sources import _json_array_values

    records = [{"url": "http://a/1.jpg", "caption": "a ] b, c"}, {"image": "é ☃", "caption": ["x", "y"]}, 12345,
               [1, [2]], "tail", {"url": "u", "caption": "\"quoted\" \\ slash"}]
    for text in (json.dumps(records), json.dumps(records, indent=2), "[]", " [ ] ", "[\n1\n]"):
        data = io.BytesIO(text.encode())
        assert list(_json_array_values(data, "x.json", read_chars)) == json.loads(text)
    for text, problem in (("[1,]", "not valid JSON"), ("[1 2]", "expected ',' or ']'"), ("[{\"a\": 1}", "not valid JSON"),
                          ("{\"a\": 1}", "expected a list of records, got dict"), ("[", "not valid JSON")):
        with pytest.raises(SourceListError, match=problem):
            list(_json_array_values(io.BytesIO(text.encode()), "x.json", read_chars))


def test_a_list_read_in_chunks_is_the_list_read_at_once(tmp_path, monkeypatch):
    # At 129M rows the list is read, checked and written a chunk at a time; duplicates across chunks still go.
    from datasets_manifests import sources

    path = tmp_path / "list.json"
    records = [{"url": f"http://h/{i % 7}.jpg", "caption": [f"c{i % 5}", "same"]} for i in range(40)]
    path.write_text(json.dumps(records))
    whole, whole_report = read_source_list(path)
    monkeypatch.setattr(sources, "CHUNK_ROWS", 3)
    chunked, chunked_report = read_source_list(path)
    assert chunked.equals(whole) and chunked_report == whole_report
    assert whole_report.rows == 35 + 7 and whole_report.duplicates == 80 - 42  # (i % 7, i % 5): 35 pairs
    assert list(whole_report.top_duplicated_urls) == [f"http://h/{i}.jpg" for i in range(5)]
    pairs = list(zip(whole.column("url").to_pylist(), whole.column("caption").to_pylist()))
    assert len(set(pairs)) == len(pairs) and pairs[0] == ("http://h/0.jpg", "c0")


def write_list(path: Path, records: list[dict]) -> None:
    """A source list of `records` in the form its suffix says (.jsonl, .csv, .parquet)."""
    import pyarrow.csv as pacsv

    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    elif path.suffix == ".csv":
        pacsv.write_csv(pa.Table.from_pylist(records), path)
    else:
        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_hash_column_is_carried_for_img2dataset_to_check(tmp_path, fmt):
    """`hash_col`: each row's expected image sha256 (lowercased) in a `sha256` column, the first of exact
    duplicates kept; a missing or malformed one is an error naming the row, before anything is downloaded."""
    digest = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(3)]
    rows = [{"url": "http://a/0.jpg", "caption": "a", "img_sha": digest[0].upper()},
            {"url": "http://a/1.jpg", "caption": "b", "img_sha": digest[1]},
            {"url": "http://a/0.jpg", "caption": "a", "img_sha": digest[2]}]  # fmt: skip
    path = tmp_path / f"list.{fmt}"

    write_list(path, rows)
    table, report = read_source_list(path, hash_col="img_sha")
    assert table.column_names == ["url", "caption", "source_key", "sha256"]
    assert table.column("sha256").to_pylist() == digest[:2] and report.duplicates == 1
    assert read_source_list(path)[0].column_names == ["url", "caption", "source_key"]  # not asked: not carried
    write_list(path, [*rows[:1], {**rows[1], "img_sha": "not-a-hash"}])
    where = "record 1" if fmt == "jsonl" else "row 1"
    with pytest.raises(SourceListError, match=f"{where} has img_sha 'not-a-hash': expected the 64 hex digits"):
        read_source_list(path, hash_col="img_sha")
    if fmt != "jsonl":
        with pytest.raises(SourceListError, match="no column 'sha'"):
            read_source_list(path, hash_col="sha")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_a_key_column_names_the_samples(tmp_path, fmt):
    """`key_col` (DataComp's `uid`): the list's own id of each row is its samples' key in every version; a missing,
    malformed or repeated one is an error naming the row and the column, before anything is downloaded."""
    rows = [{"url": "http://a/0.jpg", "caption": "a", "uid": "0f3a"},
            {"url": "http://a/1.jpg", "caption": "b", "uid": "9bc1"},
            {"url": "http://a/0.jpg", "caption": "a", "uid": "77aa"}]  # fmt: skip
    path = tmp_path / f"list.{fmt}"

    write_list(path, rows)
    table, report = read_source_list(path, key_col="uid")
    assert table.column("source_key").to_pylist() == ["0f3a", "9bc1"] and report.duplicates == 1
    assert read_source_list(path)[0].column("source_key").to_pylist()[0] == source_key("http://a/0.jpg", "a")
    where = "record" if fmt == "jsonl" else "row"
    for changed, problem in (({"uid": "a.b"}, f"{where} 1 has uid 'a.b': expected 1-64"),
                             ({"uid": "0f3a", "caption": "c"}, "column 'uid' repeats '0f3a'")):
        write_list(path, [rows[0], {**rows[1], **changed}])
        with pytest.raises(SourceListError, match=problem):
            read_source_list(path, key_col="uid")
    if fmt == "jsonl":  # a caption list would give one key to several rows
        write_list(path, [{**rows[0], "caption": ["a", "b"]}])
        with pytest.raises(SourceListError, match="record 0 has 2 captions and one uid"):
            read_source_list(path, key_col="uid")
    else:
        write_list(path, rows)
        with pytest.raises(SourceListError, match="no column 'id'"):
            read_source_list(path, key_col="id")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_extra_columns_are_carried_with_their_types(tmp_path, fmt):
    """`extra_cols` (img2dataset's save_additional_columns: LAION's similarity, punsafe): after url, caption,
    source_key and sha256, a parquet list's types kept (a csv's are text); a missing one names the columns there."""
    rows = [{"url": "http://a/0.jpg", "caption": "a", "similarity": 0.31, "punsafe": 0.01},
            {"url": "http://a/1.jpg", "caption": "b", "similarity": 0.29, "punsafe": 0.2},
            {"url": "http://a/0.jpg", "caption": "a", "similarity": 0.5, "punsafe": 0.0}]  # fmt: skip
    path = tmp_path / f"list.{fmt}"
    write_list(path, rows)
    table, report = read_source_list(path, extra_cols=("similarity", "punsafe"))
    assert table.column_names == ["url", "caption", "source_key", "similarity", "punsafe"] and report.duplicates == 1
    values = table.column("similarity").to_pylist()
    assert values == ([0.31, 0.29] if fmt == "parquet" else ["0.31", "0.29"])  # the first of the duplicates
    assert read_source_list(path, extra_cols=("similarity",))[0].column_names[3:] == ["similarity"]
    with pytest.raises(SourceListError, match="no column 'aesthetic'"):
        read_source_list(path, extra_cols=("aesthetic",))


def test_an_extra_column_json_cannot_hold_is_refused_naming_its_type(tmp_path):
    """img2dataset writes a sample's extra columns into its .json: a timestamp (or date, decimal, bytes) failed
    json.dumps for every image, each sample went missing from its shard, and the download never completed."""
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": ["http://a/0.jpg"], "caption": ["a"], "crawled": [datetime.datetime(2024, 5, 1)],
                             "tags": [["x", "y"]], "box": [{"w": 3, "h": 4}]}), path)  # fmt: skip
    with pytest.raises(SourceListError, match=r"extra column 'crawled' is timestamp\[us\]: .* cast it"):
        read_source_list(path, extra_cols=("tags", "crawled"))
    table, _ = read_source_list(path, extra_cols=("tags", "box"))  # lists and records of plain values: carried
    assert table.column("tags").to_pylist() == [["x", "y"]] and table.column("box").to_pylist() == [{"w": 3, "h": 4}]


def test_a_csv_with_excels_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark: it was glued to the first column's name, and the list
    was refused for having no url column while its header showed one."""
    path = tmp_path / "list.csv"
    path.write_bytes("\ufeffurl,caption,score\nhttp://a/0.jpg,a red circle,0.3\n".encode())
    table, _ = read_source_list(path, extra_cols=("score",))
    assert table.select(["url", "caption", "score"]).to_pylist() == [
        {"url": "http://a/0.jpg", "caption": "a red circle", "score": "0.3"}]


def test_extra_columns_are_refused_from_json_records(tmp_path):
    path = tmp_path / "list.jsonl"
    write_list(path, [{"url": "http://a/0.jpg", "caption": "a", "similarity": 0.3}])
    with pytest.raises(SourceListError, match="carried from a table source list"):
        read_source_list(path, extra_cols=("similarity",))
