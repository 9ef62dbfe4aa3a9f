"""Source-list readers: the forms BLIP's web data is published in, normalised into one parquet for img2dataset.

Accepted forms:
- BLIP's annotation JSON (salesforce/BLIP `configs/pretrain.yaml` `train_file`s, e.g. `ccs_filtered.json`):
  a list of `{"url" | "image": ..., "caption": str | [str, ...]}`; a caption list becomes one row per caption.
- img2dataset's inputs: `.csv`, `.tsv`, `.parquet` with a url column and a caption column (names configurable;
  common aliases `URL`/`TEXT` of LAION and `image_url` are recognised).
The output has `url`, `caption`, `source_key` (sha256 of url + caption, 16 hex digits: stable whatever the file
order, and a valid webdataset key). A csv/tsv/parquet list may bring its own `source_key` column instead (ids that
must not change when the URLs do, e.g. a mirror or the demo corpus's server on an ephemeral port): letters,
digits, `_` and `-`, at most 64, unique. Exact (url, caption) duplicates are dropped and counted: BLIP issue #154 shows
a single URL with ~9M captions in the released LAION-115M list.
A list is read through fsspec, so `s3://...` and `gs://...` work once the `s3`/`gcs` extra is installed.
Stdlib + pyarrow + fsspec only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

# Re-exported: callers import them from here too.
from datasets_manifests.filesystems import (  # noqa: F401
    MissingFilesystemError, missing_filesystem_message, sha256_file, url_to_fs)

KEY_COLUMN = "source_key"  # optional in table forms: the list's own stable sample ids
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # a webdataset key: no '.' (extension separator) nor '/'
URL_ALIASES = ("url", "URL", "image_url", "image", "img_url")
CAPTION_ALIASES = ("caption", "TEXT", "text", "alt", "alt_text")
SOURCE_SCHEMA = pa.schema([("url", pa.string()), ("caption", pa.string()), ("source_key", pa.string())])


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


def read_source_list(path: str | Path, url_col: str | None = None, caption_col: str | None = None) -> tuple[pa.Table, SourceReport]:
    """Read any accepted form (a local path or an fsspec URL) into a (url, caption, source_key) table with exact
    duplicates removed."""
    fs, fs_path = url_to_fs(path)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"{path}: source list not found")
    fmt = detect_format(str(path))
    with fs.open(fs_path, "rb") as handle:
        given_keys: list[str] | None = None
        if fmt in ("json", "jsonl"):
            urls, captions, records = _read_blip_json(handle, str(path), fmt)
        else:
            urls, captions, records, given_keys = _read_table(handle, str(path), fmt, url_col, caption_col)
    report = SourceReport(path=str(path), format=fmt, records=records)
    seen: set[tuple[str, str]] = set()
    per_url: dict[str, int] = {}
    out_urls, out_captions, keys = [], [], []
    for index, (url, caption) in enumerate(zip(urls, captions)):
        if (url, caption) in seen:
            report.duplicates += 1
            continue
        seen.add((url, caption))
        per_url[url] = per_url.get(url, 0) + 1
        out_urls.append(url)
        out_captions.append(caption)
        keys.append(given_keys[index] if given_keys is not None else source_key(url, caption))
    if given_keys is not None and len(set(keys)) != len(keys):
        repeated = next(key for key in keys if keys.count(key) > 1)
        raise SourceListError(f"{path}: column {KEY_COLUMN!r} repeats {repeated!r} (keys must be unique)")
    report.rows = len(out_urls)
    worst = sorted(per_url.items(), key=lambda item: -item[1])[:5]
    report.top_duplicated_urls = {url: count for url, count in worst if count > 1}
    table = pa.table([pa.array(out_urls, pa.string()), pa.array(out_captions, pa.string()), pa.array(keys, pa.string())],
                     schema=SOURCE_SCHEMA)
    return table, report


def normalise_source_list(path: str | Path, out_path: str | Path, url_col: str | None = None,
                          caption_col: str | None = None) -> SourceReport:
    """Read a source list and write the normalised parquet that the download stage feeds img2dataset."""
    table, report = read_source_list(path, url_col, caption_col)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return report


def _read_blip_json(handle: IO[bytes], path: str, fmt: str) -> tuple[list[str], list[str], int]:
    text = handle.read().decode("utf-8")
    try:
        if fmt == "jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SourceListError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(data, list):
        raise SourceListError(f"{path}: expected a list of records, got {type(data).__name__}")
    urls: list[str] = []
    captions: list[str] = []
    for index, record in enumerate(data):
        if not isinstance(record, dict):
            raise SourceListError(f"{path}: record {index} is {type(record).__name__}, expected an object")
        url = record.get("url", record.get("image"))
        if not isinstance(url, str) or not url:
            raise SourceListError(f"{path}: record {index} has no 'url' or 'image' string: {_short(record)}")
        caption = record.get("caption")
        caption_list = caption if isinstance(caption, list) else [caption]
        if not caption_list or not all(isinstance(c, str) for c in caption_list):
            raise SourceListError(f"{path}: record {index} caption must be a string or a list of strings: {_short(record)}")
        for text_caption in caption_list:
            urls.append(url)
            captions.append(text_caption)
    return urls, captions, len(data)


def _read_table(handle: IO[bytes], path: str, fmt: str, url_col: str | None,
                caption_col: str | None) -> tuple[list[str], list[str], int, list[str] | None]:
    if fmt == "parquet":
        try:
            table = pq.read_table(handle)
        except (pa.ArrowInvalid, OSError) as error:
            raise SourceListError(f"{path}: not a readable parquet file ({error})") from error
    else:
        import pyarrow.csv as pacsv

        try:
            table = pacsv.read_csv(handle, parse_options=pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ","),
                                   convert_options=pacsv.ConvertOptions(strings_can_be_null=False))
        except pa.ArrowInvalid as error:
            raise SourceListError(f"{path}: malformed {fmt}: {error}") from error
    url_name = _column(table, path, url_col, URL_ALIASES, "url")
    caption_name = _column(table, path, caption_col, CAPTION_ALIASES, "caption")
    urls = table.column(url_name).to_pylist()
    captions = table.column(caption_name).to_pylist()
    for index, (url, caption) in enumerate(zip(urls, captions)):
        if not isinstance(url, str) or not url:
            raise SourceListError(f"{path}: row {index} has an empty {url_name!r}")
        if caption is None:
            captions[index] = ""
        elif not isinstance(caption, str):
            captions[index] = str(caption)
    given_keys = None
    if KEY_COLUMN in table.column_names:
        given_keys = table.column(KEY_COLUMN).to_pylist()
        for index, key in enumerate(given_keys):
            if not isinstance(key, str) or not _KEY_RE.match(key):
                raise SourceListError(f"{path}: row {index} has {KEY_COLUMN} {key!r}: expected 1-64 letters, digits, "
                                      "'_' or '-'")
    return urls, captions, len(urls), given_keys


def _column(table: pa.Table, path: str, wanted: str | None, aliases: tuple[str, ...], what: str) -> str:
    names = table.column_names
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
