"""Source-list readers: the forms BLIP's web data is published in, normalised into one parquet for img2dataset.

Accepted forms:
- BLIP's annotation JSON (salesforce/BLIP `configs/pretrain.yaml` `train_file`s, e.g. `ccs_filtered.json`):
  a list of `{"url" | "image": ..., "caption": str | [str, ...]}`; a caption list becomes one row per caption.
- img2dataset's inputs: `.csv`, `.tsv`, `.parquet` with a url column and a caption column (names configurable;
  common aliases `URL`/`TEXT` of LAION and `image_url` are recognised).
The output has `url`, `caption`, `source_key` (sha256 of url + caption, 16 hex digits: stable whatever the file
order, and a valid webdataset key). A csv/tsv/parquet list may bring its own `source_key` column instead (ids that
must not change when the URLs do, e.g. a mirror or the demo corpus's server on an ephemeral port): letters,
digits, `_` and `-`, at most 64, unique. With `hash_col` (a column, or a JSON record's field, holding the sha256 of
each image's original bytes, as DataComp's metadata does), the output has a `sha256` column too, which img2dataset
checks each downloaded image against (`verify_hash`): an image changed since the list was made is not stored.
Exact (url, caption) duplicates are dropped and counted: BLIP issue #154 shows
a single URL with ~9M captions in the released LAION-115M list.
A list is read through fsspec, so `s3://...` and `gs://...` work once the `s3`/`gcs` extra is installed.
Stdlib, numpy, pyarrow and fsspec (tqdm for the progress bar of a large list).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# Re-exported: callers import them from here too.
from datasets_manifests.filesystems import (  # noqa: F401
    MissingFilesystemError, missing_filesystem_message, sha256_file, url_to_fs)
from datasets_manifests.index import open_parquet
from datasets_manifests.spill import digest16, read_spilled, spill_writer

KEY_COLUMN = "source_key"  # optional in table forms: the list's own stable sample ids
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a webdataset key: no '.' (extension separator) nor '/'
URL_ALIASES = ("url", "URL", "image_url", "image", "img_url")
CAPTION_ALIASES = ("caption", "TEXT", "text", "alt", "alt_text")
SOURCE_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("source_key", pa.string())])
HASH_COLUMN = "sha256"  # the normalised list's expected image hash, with `hash_col` (img2dataset's verify_hash)
HASHED_SOURCE_SCHEMA = SOURCE_SCHEMA.append(pa.field(HASH_COLUMN, pa.string()))
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class SourceListError(ValueError):
    """A malformed source list; the message names the file and the record."""


def source_list_sha256(path: str | Path) -> str:
    """sha256 of a source list's bytes (local or URL): the download stage's default source identity."""
    fs, fs_path = url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"{path}: source list not found")
    return sha256_file(fs_path, fs)[0]


@dataclass
class SourceReport:
    """What reading a source list did."""

    path: str
    format: str
    records: int = 0  # records in the file (a caption list counts once)
    rows: int = 0  # (url, caption) rows written
    duplicates: int = 0  # exact (url, caption) duplicates dropped
    top_duplicated_urls: dict[str, int] = field(default_factory=dict)  # url -> caption rows, for the worst few

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def source_key(url: str, caption: str) -> str:
    return hashlib.sha256(f"{url}\n{caption}".encode()).hexdigest()[:16]


def detect_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix in ("json", "jsonl", "csv", "tsv", "parquet"):
        return suffix
    raise SourceListError(f"{path}: unknown source list format {suffix!r} (expected .json, .jsonl, .csv, .tsv, .parquet)")


def read_source_list(path: str | Path, url_col: str | None = None, caption_col: str | None = None,
                     hash_col: str | None = None, key_col: str | None = None,
                     extra_cols: tuple[str, ...] = ()) -> tuple[pa.Table, SourceReport]:  # fmt: skip
    """Read any accepted form (a local path or an fsspec URL) into a (url, caption, source_key[, sha256]) table
    with exact duplicates removed. In memory: for a list of any size, `normalise_source_list` writes it to a file."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="source-list-") as tmp:
        report = normalise_source_list(path, Path(tmp) / "source.parquet", url_col, caption_col, hash_col, key_col,
                                       extra_cols)
        return pq.read_table(Path(tmp) / "source.parquet"), report


# Rows read, checked and written at a time: memory is ~50 bytes per row (digests) plus one chunk (~1.4 KB a row).
CHUNK_ROWS = 1 << 18


def normalise_source_list(path: str | Path, out_path: str | Path, url_col: str | None = None,
                          caption_col: str | None = None, hash_col: str | None = None,
                          key_col: str | None = None, extra_cols: tuple[str, ...] = ()) -> SourceReport:  # fmt: skip
    """Read a source list and write the normalised parquet that the download stage feeds img2dataset.

    Each row's `source_key` (its samples' key in every version) is the list's own id where it has one — the
    column `key_col` (DataComp's `uid`), else a `source_key` column — and otherwise a hash of its url and caption.
    `extra_cols` (a table list's other columns: LAION's `similarity`, DataComp's `clip_l14_similarity_score`) are
    carried after them, with the parquet file's types (a csv's are text).

    Streams: the list (BLIP's 115M-record LAION JSON included) is read a chunk at a time into an Arrow file
    beside `out_path`, keeping only 128-bit digests of each (url, caption) pair, URL and given key; the exact
    duplicates are then found on the digests, and the kept rows written out in the list's order."""
    from tqdm import tqdm

    fs, fs_path = url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"{path}: source list not found")
    fmt = detect_format(str(path))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged = out.with_name(f".{out.name}.rows.arrow")
    report = SourceReport(path=str(path), format=fmt)
    pairs, urls, keys = [], [], []
    given_keys = False
    schema = HASHED_SOURCE_SCHEMA if hash_col else SOURCE_SCHEMA
    for extra in _extra_fields(fs, fs_path, str(path), fmt, extra_cols):
        schema = schema.append(extra)
    progress = tqdm(desc=f"reading {Path(fs_path).name}", unit=" rows", unit_scale=True,
                    disable=(fs.size(fs_path) or 0) < 64 << 20)  # fmt: skip
    try:
        with progress, fs.open(fs_path, "rb") as handle, spill_writer(staged, schema) as writer:
            chunks = _json_chunks(handle, str(path), fmt, hash_col, key_col) if fmt in ("json", "jsonl") else \
                _table_chunks(handle, str(path), fmt, url_col, caption_col, hash_col, key_col, extra_cols)  # fmt: skip
            for chunk_urls, chunk_captions, chunk_keys, records, chunk_hashes, *extras in chunks:
                report.records += records
                given_keys = chunk_keys is not None
                given = pa.array(chunk_keys, pa.string()) if given_keys else pa.nulls(len(chunk_urls), pa.string())
                hashes = [pa.array(chunk_hashes, pa.string())] if hash_col else []
                carried = extras[0] if extras else []  # a table list's extra columns
                writer.write_table(pa.table([pa.array(chunk_urls, pa.string()), pa.array(chunk_captions, pa.string()),
                                             given, *hashes, *carried], schema=schema))  # fmt: skip
                pairs.append(_digests(f"{url}\n{caption}" for url, caption in zip(chunk_urls, chunk_captions)))
                urls.append(_digests(chunk_urls))
                if given_keys:
                    keys.append(_digests(chunk_keys))
                progress.update(len(chunk_urls))
        _write_kept(staged, out, report, pairs, urls, keys if given_keys else None, schema, key_col or KEY_COLUMN)
    finally:
        staged.unlink(missing_ok=True)
    return report


def _digests(texts: Any) -> np.ndarray:
    return np.array([digest16(text) for text in texts], dtype="V16")


def _write_kept(staged: Path, out: Path, report: SourceReport, pairs: list[np.ndarray], urls: list[np.ndarray],
                keys: list[np.ndarray] | None, schema: pa.Schema = SOURCE_SCHEMA,
                key_name: str = KEY_COLUMN) -> None:  # fmt: skip
    """Drop the exact duplicates (the first of each (url, caption) pair stays), count the URLs with most captions,
    check given keys are unique, and write the kept rows of `staged` to `out`."""
    def joined(parts: list[np.ndarray]) -> np.ndarray:
        whole = np.concatenate(parts) if parts else np.zeros(0, dtype="V16")
        parts.clear()  # the chunks' arrays go as soon as they are joined
        return whole

    pair_digests = joined(pairs)
    _, first = np.unique(pair_digests, return_index=True)
    keep = np.zeros(len(pair_digests), dtype=bool)
    keep[first] = True
    report.rows, report.duplicates = len(first), len(pair_digests) - len(first)
    del pair_digests, first
    url_digests = joined(urls)[keep]
    values, first_seen, counts = np.unique(url_digests, return_index=True, return_counts=True)
    worst = [int(i) for i in np.lexsort((first_seen, -counts))[:5] if counts[i] > 1]  # most captions, first seen first
    wanted = {values[i].tobytes(): int(counts[i]) for i in worst}
    repeated_key: bytes | None = None
    if keys is not None:
        key_digests = joined(keys)[keep]
        unique_keys, key_counts = np.unique(key_digests, return_counts=True)
        if len(unique_keys) != len(key_digests):
            repeated_key = unique_keys[np.flatnonzero(key_counts > 1)[0]].tobytes()
    found: dict[bytes, str] = {}
    table = read_spilled([staged], schema)
    if repeated_key is not None:
        for key in table.column("source_key").to_pylist():
            if digest16(key) == repeated_key:
                raise SourceListError(f"{report.path}: column {key_name!r} repeats {key!r} (keys must be unique)")
    with pq.ParquetWriter(str(out), schema) as writer:
        for first_row in range(0, len(table), CHUNK_ROWS):
            chunk = table.slice(first_row, CHUNK_ROWS).filter(pa.array(keep[first_row : first_row + CHUNK_ROWS]))
            chunk_urls, captions = chunk.column("url").to_pylist(), chunk.column("caption").to_pylist()
            for url in chunk_urls:
                digest = digest16(url) if wanted else None
                if digest in wanted and digest not in found:
                    found[digest] = url
            source_keys = chunk.column("source_key") if keys is not None else \
                pa.array([source_key(url, caption) for url, caption in zip(chunk_urls, captions)], pa.string())  # fmt: skip
            rest = [chunk.column(name) for name in schema.names[3:]]  # the expected hashes, the extra columns
            writer.write_table(pa.table([chunk.column("url"), chunk.column("caption"), source_keys, *rest],
                                        schema=schema))  # fmt: skip
    report.top_duplicated_urls = {found[digest]: count for digest, count in wanted.items()}


# (urls, captions, given keys or None, records read, expected image hashes or None[, extra columns]) of a part of a
# list (the extra columns only from table lists)
Chunk = tuple[Any, ...]


def _json_chunks(handle: IO[bytes], path: str, fmt: str, hash_col: str | None = None,
                 key_col: str | None = None) -> Iterator[Chunk]:  # fmt: skip
    """(urls, captions, keys, records, hashes) of BLIP annotation records, CHUNK_ROWS-ish rows at a time; a caption
    list becomes one row per caption; hashes: each record's `hash_col` field, keys its `key_col` field (None
    without them)."""
    urls: list[str] = []
    captions: list[str] = []
    hashes: list[str] = []
    keys: list[str] = []
    records = 0
    values = _jsonl_values(handle, path) if fmt == "jsonl" else _json_array_values(handle, path)
    for index, record in enumerate(values):
        if not isinstance(record, dict):
            raise SourceListError(f"{path}: record {index} is {type(record).__name__}, expected an object")
        url = record.get("url", record.get("image"))
        if not isinstance(url, str) or not url:
            raise SourceListError(f"{path}: record {index} has no 'url' or 'image' string: {_short(record)}")
        caption = record.get("caption")
        caption_list = caption if isinstance(caption, list) else [caption]
        if not caption_list or not all(isinstance(c, str) for c in caption_list):
            raise SourceListError(f"{path}: record {index} caption must be a string or a list of strings: {_short(record)}")
        if hash_col:
            hashes += [_checked_hash(record.get(hash_col), path, f"record {index}", hash_col)] * len(caption_list)
        if key_col:
            if len(caption_list) != 1:
                raise SourceListError(f"{path}: record {index} has {len(caption_list)} captions and one {key_col}: "
                                      f"a key names one (url, caption) row: {_short(record)}")  # fmt: skip
            keys.append(_checked_key(record.get(key_col), path, f"record {index}", key_col))
        urls += [url] * len(caption_list)
        captions += caption_list
        records += 1
        if len(urls) >= CHUNK_ROWS:
            yield urls, captions, keys if key_col else None, records, hashes if hash_col else None
            urls, captions, hashes, keys, records = [], [], [], [], 0
    if urls or records:
        yield urls, captions, keys if key_col else None, records, hashes if hash_col else None


def _checked_key(value: Any, path: str, where: str, column: str) -> str:
    """A sample key as webdataset needs it (no '.' or '/'), or a SourceListError naming the record."""
    if isinstance(value, str) and _KEY_RE.match(value):
        return value
    raise SourceListError(f"{path}: {where} has {column} {value!r}: expected 1-64 letters, digits, '_' or '-'")


def _checked_hash(value: Any, path: str, where: str, column: str) -> str:
    """A sha256 hex digest (lowercased), or a SourceListError naming the record: img2dataset would drop every image
    whose expected hash is missing or malformed as a mismatch."""
    if isinstance(value, str) and _SHA256_RE.match(value.lower()):
        return value.lower()
    raise SourceListError(f"{path}: {where} has {column} {value!r}: expected the 64 hex digits of a sha256")


def _jsonl_values(handle: IO[bytes], path: str) -> Iterator[Any]:
    for number, line in enumerate(io.TextIOWrapper(handle, encoding="utf-8"), start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise SourceListError(f"{path}: not valid JSON (line {number}: {error})") from error


def _json_array_values(handle: IO[bytes], path: str, read_chars: int = 1 << 22) -> Iterator[Any]:
    """The values of a top-level JSON array, decoded one at a time from a text stream: a BLIP annotation file of
    100M records is never held whole (as text or as Python objects)."""
    decoder = json.JSONDecoder()
    stream = io.TextIOWrapper(handle, encoding="utf-8")
    buffer, position, done = "", 0, False

    def more() -> bool:
        nonlocal buffer, position, done
        text = stream.read(read_chars)
        buffer, position, done = buffer[position:] + text, 0, not text
        return bool(text)

    def skip_space() -> None:
        nonlocal position
        while True:
            while position < len(buffer) and buffer[position] in " \t\r\n":
                position += 1
            if position < len(buffer) or not more():
                return

    skip_space()
    if position >= len(buffer) or buffer[position] != "[":
        rest = buffer[position:] + stream.read()
        try:
            data = json.loads(rest)
        except json.JSONDecodeError as error:
            raise SourceListError(f"{path}: not valid JSON ({error})") from error
        raise SourceListError(f"{path}: expected a list of records, got {type(data).__name__}")
    position += 1
    index = 0
    while True:
        skip_space()
        if position < len(buffer) and buffer[position] == "]" and index == 0:
            return
        while True:  # one value; a value cut by the end of the buffer is decoded again with more text
            try:
                value, end = decoder.raw_decode(buffer, position)
                if end < len(buffer) or done:
                    break
            except json.JSONDecodeError as error:
                if done:
                    raise SourceListError(f"{path}: not valid JSON (record {index}: {error.msg})") from error
            more()
        yield value
        index += 1
        position = end
        skip_space()
        if position < len(buffer) and buffer[position] == ",":
            position += 1
        elif position < len(buffer) and buffer[position] == "]":
            return
        else:
            raise SourceListError(f"{path}: not valid JSON (after record {index - 1}: expected ',' or ']')")


def _extra_fields(fs: Any, fs_path: str, path: str, fmt: str, extra_cols: tuple[str, ...]) -> list[pa.Field]:
    """The fields of the columns carried beside url and caption: a parquet file's types, a csv's text."""
    if not extra_cols:
        return []
    if fmt in ("json", "jsonl"):
        raise SourceListError(f"{path}: extra columns ({', '.join(extra_cols)}) are carried from a table source list "
                              "(parquet, csv, tsv), not from JSON records")  # fmt: skip
    with fs.open(fs_path, "rb") as handle:
        if fmt == "parquet":
            schema = open_parquet(handle).schema_arrow
            names = schema.names
        else:
            header = handle.readline().decode("utf-8-sig", errors="replace")  # -sig: Excel's byte-order mark
            names = next(csv.reader([header], delimiter="\t" if fmt == "tsv" else ","), [])
    fields = []
    for name in extra_cols:
        _column(names, path, name, (), "extra")
        field = schema.field(name) if fmt == "parquet" else pa.field(name, pa.string())
        if not _json_writable(field.type):
            # img2dataset writes each sample's extra columns into its .json: json.dumps failed for every image, each
            # sample went missing from its shard and the download could never account for them.
            raise SourceListError(f"{path}: extra column {name!r} is {field.type}: a sample's extra columns go into "
                                  "its JSON, which holds numbers, strings, booleans and lists or records of them; "
                                  "cast it in the source list (a string, say)")  # fmt: skip
        fields.append(field)
    return fields


def _json_writable(kind: pa.DataType) -> bool:
    """Whether pyarrow gives values of `kind` as Python values json.dumps writes (not datetimes, Decimals, bytes)."""
    import pyarrow.types as t

    if t.is_dictionary(kind):
        return _json_writable(kind.value_type)
    if t.is_list(kind) or t.is_large_list(kind) or t.is_fixed_size_list(kind):
        return _json_writable(kind.value_type)
    if t.is_struct(kind):
        return all(_json_writable(kind.field(i).type) for i in range(kind.num_fields))
    return (t.is_integer(kind) or t.is_floating(kind) or t.is_boolean(kind) or t.is_null(kind)
            or t.is_string(kind) or t.is_large_string(kind))  # fmt: skip


def _table_chunks(handle: IO[bytes], path: str, fmt: str, url_col: str | None, caption_col: str | None,
                  hash_col: str | None = None, key_col: str | None = None,
                  extra_cols: tuple[str, ...] = ()) -> Iterator[Chunk]:  # fmt: skip
    """(urls, captions, given keys or None, rows, hashes or None, extra columns) of an img2dataset-style table, a
    batch at a time."""
    if fmt == "parquet":
        try:
            parquet = open_parquet(handle)
        except (pa.ArrowInvalid, OSError) as error:
            raise SourceListError(f"{path}: not a readable parquet file ({error})") from error
        names = parquet.schema_arrow.names
        url_name = _column(names, path, url_col, URL_ALIASES, "url")
        caption_name = _column(names, path, caption_col, CAPTION_ALIASES, "caption")
        hash_name = _column(names, path, hash_col, (), "hash") if hash_col else None
        key_name = _key_column(names, path, key_col)
        columns = list(dict.fromkeys([url_name, caption_name, *filter(None, [key_name, hash_name]), *extra_cols]))
        batches: Iterator[Any] = parquet.iter_batches(batch_size=CHUNK_ROWS, columns=columns)
    else:
        import pyarrow.csv as pacsv

        delimiter = "\t" if fmt == "tsv" else ","
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which glued itself to the first column's
        # name ("\ufeffurl": no url column, said of a file whose header shows one); Arrow skips it too.
        header = handle.readline().decode("utf-8-sig", errors="replace")
        handle.seek(0)
        names = next(csv.reader([header], delimiter=delimiter), [])
        url_name = _column(names, path, url_col, URL_ALIASES, "url")
        caption_name = _column(names, path, caption_col, CAPTION_ALIASES, "caption")
        hash_name = _column(names, path, hash_col, (), "hash") if hash_col else None
        key_name = _key_column(names, path, key_col)
        try:  # every column read as text: a caption column of digits stays text
            batches = pacsv.open_csv(handle, read_options=pacsv.ReadOptions(block_size=64 << 20),
                                     parse_options=pacsv.ParseOptions(delimiter=delimiter),
                                     convert_options=pacsv.ConvertOptions(strings_can_be_null=False,
                                                                          column_types={n: pa.string() for n in names}))  # fmt: skip
        except pa.ArrowInvalid as error:
            raise SourceListError(f"{path}: malformed {fmt}: {error}") from error
    row = 0
    try:
        for batch in batches:
            urls = batch.column(url_name).to_pylist()
            captions = batch.column(caption_name).to_pylist()
            for index, (url, caption) in enumerate(zip(urls, captions)):
                if not isinstance(url, str) or not url:
                    raise SourceListError(f"{path}: row {row + index} has an empty {url_name!r}")
                if caption is None:
                    captions[index] = ""
                elif not isinstance(caption, str):
                    captions[index] = str(caption)
            given_keys = None
            if key_name is not None:
                given_keys = [_checked_key(key, path, f"row {row + index}", key_name)
                              for index, key in enumerate(batch.column(key_name).to_pylist())]  # fmt: skip
            hashes = None
            if hash_name is not None:
                hashes = [_checked_hash(value, path, f"row {row + index}", hash_name)
                          for index, value in enumerate(batch.column(hash_name).to_pylist())]  # fmt: skip
            row += len(urls)
            yield urls, captions, given_keys, len(urls), hashes, [batch.column(name) for name in extra_cols]
    except pa.ArrowInvalid as error:
        raise SourceListError(f"{path}: malformed {fmt}: {error}") from error


def _key_column(names: list[str], path: str, key_col: str | None) -> str | None:
    """The column of the list's own sample ids: `key_col` (which must be there), else `source_key` if present."""
    if key_col:
        return _column(names, path, key_col, (), "key")
    return KEY_COLUMN if KEY_COLUMN in names else None


def _column(names: list[str], path: str, wanted: str | None, aliases: tuple[str, ...], what: str) -> str:
    if wanted:
        if wanted not in names:
            raise SourceListError(f"{path}: no column {wanted!r} (columns: {', '.join(names)})")
        return wanted
    for alias in aliases:
        if alias in names:
            return alias
    raise SourceListError(f"{path}: no {what} column (looked for {', '.join(aliases)}; columns: {', '.join(names)})")


def _short(record: Any) -> str:
    text = json.dumps(record, ensure_ascii=False, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
