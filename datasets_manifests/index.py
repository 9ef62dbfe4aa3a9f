"""The per-sample index of a dataset version: one Parquet row per sample, kept *and* dropped.

Every dataset version carries `index.parquet` (file role "index"): where each sample came from (url),
what its image is (sha256, size), its captions, where it lives (shard path + byte offset of the `.jpg`
member in the tar) and whether it was kept or dropped, and why. Later stages add a derived layer,
`texts.parquet`, with every candidate text per key (web and synthetic) and the CapFilt decision on it.
This is the per-sample lineage the released BLIP data lacks (only url+caption JSONs were published):
a key is stable across derived versions, so `diff` can tell what a stage changed sample by sample.

Lookups go through `pyarrow.dataset` with filter expressions and early-stopping scans, so browsing a
million-row index reads only the columns and row groups it needs; work over a whole file (verify, diff, the
browser's filters and histograms) reads it a batch at a time with `iter_parquet`, which holds about one batch
whatever the file's size. Imports pyarrow (not torch/ray).
"""

from __future__ import annotations

import contextlib
import math
import operator
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import NotFoundError, Registry, RegistryError

INDEX_FILE = "index.parquet"
TEXTS_FILE = "texts.parquet"
INDEX_ROLE = "index"
STATUSES = ("ok", "dropped")
TEXT_SOURCES = ("web", "synthetic")
ROW_GROUP_SIZE = 64 * 1024  # row groups small enough that a filtered page read touches few of them
# Rows a stage builds, validates and writes at a time with `write_index_batches` (~1 KB of memory each meanwhile).
INDEX_BATCH_ROWS = 4 * ROW_GROUP_SIZE

INDEX_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # unique per version, stable across derived versions
    pa.field("url", pa.string()),
    pa.field("image_sha256", pa.string()),  # null when the image never arrived
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("caption", pa.string()),  # the normalised training caption (pre_caption)
    pa.field("raw_caption", pa.string()),  # the original web text
    pa.field("caption_source", pa.string()),  # "web" for raw data, "synthetic" after CapFilt
    pa.field("split", pa.string()),
    pa.field("shard", pa.string()),  # file path inside the version; null for dropped samples
    pa.field("jpg_offset", pa.int64()),  # byte offset of the key's .jpg member data in the tar
    pa.field("jpg_bytes", pa.int64()),
    pa.field("status", pa.string(), nullable=False),  # "ok" | "dropped"
    pa.field("drop_reason", pa.string()),  # null when ok
])

TEXTS_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),  # the sample key of index.parquet
    pa.field("text", pa.string()),
    pa.field("source", pa.string(), nullable=False),  # "web" | "synthetic"
    pa.field("itm_score", pa.float32()),  # filter's match probability for (image, text)
    pa.field("kept", pa.bool_(), nullable=False),
    pa.field("drop_reason", pa.string()),  # null when kept
])

# Optional index columns of a version with texts.parquet written in the index's order (CapFilt's): where each
# sample's texts are (its first text's row number in texts.parquet, and how many), so that a page of samples reads
# its texts by position; without them (or when they disagree with the texts' keys) the texts are looked up by key.
TEXTS_POSITION = ("texts_row", "texts_count")

# Manifest metadata: the source list's own columns (the download's `save_additional_columns`, e.g. DataComp's
# `uid` or LAION's `similarity`) that a version's index carries after its own; the stages that derive a version
# carry them on, so that a bootstrapped sample still has its list's scores.
SOURCE_COLUMNS = "source_columns"

# What a `--where width=32` string turns into, per Arrow type.
_PARSERS = {
    pa.int32(): int, pa.int64(): int, pa.float32(): float, pa.float64(): float,
    pa.bool_(): lambda text: {"true": True, "1": True, "false": False, "0": False}[text.lower()],
}


class SampleIndexError(RegistryError):
    """A per-sample index that is malformed or cannot answer the query; the message says why."""


@dataclass(frozen=True)
class Compare:
    """A `where` condition other than equality: `--where similarity>=0.28` is Compare(">=", "0.28")."""

    op: str  # one of COMPARISONS
    value: Any

    def __post_init__(self) -> None:
        if self.op not in COMPARISONS:
            raise SampleIndexError(f"where: comparison {self.op!r} (use one of {', '.join(COMPARISONS)})")


COMPARISONS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt}  # on Arrow expressions


# --------------------------------------------------------------------------- writing
def _to_table(rows_or_table: pa.Table | Iterable[dict[str, Any]], schema: pa.Schema, what: str) -> pa.Table:
    if isinstance(rows_or_table, pa.Table):
        table = rows_or_table
    else:
        rows = list(rows_or_table)
        required = set(schema.names)
        for row in rows:
            if not required <= row.keys():  # a missing key is a bug in the writer (None is spelled out)
                missing = sorted(required - row.keys())
                raise SampleIndexError(f"{what}: row {row.get('key')!r} lacks required column(s) {', '.join(missing)}")
        names = schema.names + sorted({k for row in rows for k in row} - required)
        arrays = {}
        for name in names:
            declared = schema.field(name).type if name in required else None
            try:
                arrays[name] = pa.array([row.get(name) for row in rows], type=declared)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
                raise SampleIndexError(f"{what}: column {name!r}: {error}") from error
        table = pa.table(arrays)
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise SampleIndexError(f"{what}: missing required column(s) {', '.join(missing)}")
    # Cast the contract columns to their declared types; extra columns pass through untouched.
    for field in schema:
        column = table.column(field.name)
        if column.type != field.type:
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise SampleIndexError(f"{what}: column {field.name!r} is {column.type}, expected {field.type}") from error
            table = table.set_column(table.schema.get_field_index(field.name), field.name, column)
        if not field.nullable and column.null_count:
            raise SampleIndexError(f"{what}: column {field.name!r} has {column.null_count} null value(s)")
    return table


def first_repeated(values: pa.ChunkedArray | pa.Array) -> tuple[Any, int] | None:
    """(a value that occurs more than once, how many times), or None when all are distinct."""
    if pc.count_distinct(values).as_py() == len(values):
        return None
    counts = pc.value_counts(values)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))[0]
    return repeated["values"].as_py(), repeated["counts"].as_py()


def _check_values(table: pa.Table, column: str, allowed: tuple[str, ...], what: str) -> None:
    bad = pc.invert(pc.is_in(table.column(column), value_set=pa.array(allowed)))
    if pc.any(bad).as_py():
        example = table.filter(bad).column(column)[0].as_py()
        raise SampleIndexError(f"{what}: column {column!r} has value {example!r} (allowed: {', '.join(allowed)})")


def validate_index(rows_or_table: pa.Table | Iterable[dict[str, Any]], what: str = INDEX_FILE) -> pa.Table:
    """Check the index contract and return the table with the contract columns cast to INDEX_SCHEMA."""
    table = _to_table(rows_or_table, INDEX_SCHEMA, what)
    repeated = first_repeated(table.column("key"))
    if repeated is not None:
        raise SampleIndexError(f"{what}: duplicate key {repeated[0]!r}; keys must be unique per version")
    _check_values(table, "status", STATUSES, what)
    # Every dropped sample is counted with a reason; kept samples have none.
    dropped = pc.equal(table.column("status"), "dropped")
    no_reason = pc.and_(dropped, pc.is_null(table.column("drop_reason")))
    if pc.any(no_reason).as_py():
        key = table.filter(no_reason).column("key")[0].as_py()
        raise SampleIndexError(f"{what}: dropped sample {key!r} has no drop_reason")
    reason_on_ok = pc.and_(pc.invert(dropped), pc.is_valid(table.column("drop_reason")))
    if pc.any(reason_on_ok).as_py():
        key = table.filter(reason_on_ok).column("key")[0].as_py()
        raise SampleIndexError(f"{what}: sample {key!r} has status 'ok' but a drop_reason")
    return table


def validate_texts(rows_or_table: pa.Table | Iterable[dict[str, Any]], what: str = TEXTS_FILE) -> pa.Table:
    table = _to_table(rows_or_table, TEXTS_SCHEMA, what)
    _check_values(table, "source", TEXT_SOURCES, what)
    no_reason = pc.and_(pc.invert(table.column("kept")), pc.is_null(table.column("drop_reason")))
    if pc.any(no_reason).as_py():
        key = table.filter(no_reason).column("key")[0].as_py()
        raise SampleIndexError(f"{what}: dropped text of {key!r} has no drop_reason")
    return table


def _write(table: pa.Table, path: str | os.PathLike[str], bloom: bool = False) -> None:
    """`bloom`: Bloom filters on the columns a sample is looked up by (datasets_manifests.bloom), one per row
    group."""
    path = str(path)
    options = {"row_group_size": ROW_GROUP_SIZE,
               "bloom_filter_options": _bloom_options(len(table), table.column_names) if bloom else None}
    if "://" in path:
        import fsspec

        with fsspec.open(path, "wb") as handle:
            pq.write_table(table, handle, **options)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, **options)


def _bloom_options(rows: int, columns: list[str]) -> dict[str, dict[str, Any]] | None:
    from datasets_manifests.bloom import bloom_filter_options

    # Sized for a row group's rows: a small index gets a small filter (a row group of 64 Ki rows: ~128 KiB).
    return bloom_filter_options(max(1, min(rows, ROW_GROUP_SIZE)), columns) or None


def write_index(rows_or_table: pa.Table | Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Validate and write `index.parquet`; returns the number of rows written."""
    table = validate_index(rows_or_table, what=str(path))
    _write(table, path, bloom=True)
    return len(table)


def write_texts(rows_or_table: pa.Table | Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> int:
    """Validate and write the derived `texts.parquet` layer; returns the number of rows written."""
    table = validate_texts(rows_or_table, what=str(path))
    _write(table, path)
    return len(table)


def write_index_batches(tables: Iterable[pa.Table], path: str | os.PathLike[str], schema: pa.Schema | None = None,
                        *, in_key_order: bool = True) -> dict[str, Any]:  # fmt: skip
    """Validate and write `index.parquet` from tables written one at a time (an index larger than memory); returns
    `summarize_index` of the whole. With `in_key_order`, keys must increase strictly across the tables (so they
    are unique); without it the caller vouches that no key is in two tables (each is checked on its own). The
    file has the columns of `schema` (default: INDEX_SCHEMA's; extra columns beyond it are kept) and is the one
    `write_index` writes for the tables' concatenation."""
    summaries = []
    last_key: str | None = None

    def check(table: pa.Table) -> pa.Table:
        nonlocal last_key
        table = validate_index(table, what=str(path))
        if len(table) and in_key_order:
            keys = table.column("key")
            if last_key is not None and keys[0].as_py() <= last_key:
                raise SampleIndexError(f"{path}: key {keys[0].as_py()!r} after {last_key!r}: batches out of key order")
            last_key = keys[-1].as_py()
        summaries.append(summarize_index(table))
        return table

    _write_batches((check(table) for table in tables), path, schema or INDEX_SCHEMA, bloom=True)
    total: dict[str, Counter] = {"counts": Counter({"total": 0, "ok": 0, "dropped": 0}), "drop_reasons": Counter(),
                                 "splits": Counter()}  # fmt: skip
    for summary in summaries:
        for part, counter in total.items():
            counter.update(summary[part])
    return {"counts": dict(total["counts"]), "drop_reasons": dict(sorted(total["drop_reasons"].items())),
            "splits": dict(sorted(total["splits"].items()))}  # fmt: skip


def write_texts_batches(tables: Iterable[pa.Table], path: str | os.PathLike[str], schema: pa.Schema | None = None) -> int:
    """Validate and write `texts.parquet` from tables written one at a time (TEXTS_SCHEMA's columns and the extra
    ones of `schema`); returns the number of rows."""
    rows = 0

    def check(table: pa.Table) -> pa.Table:
        nonlocal rows
        rows += len(table)
        return validate_texts(table, what=str(path))

    _write_batches((check(table) for table in tables), path, schema or TEXTS_SCHEMA)
    return rows


def _write_batches(tables: Iterable[pa.Table], path: str | os.PathLike[str], schema: pa.Schema,
                   bloom: bool = False) -> None:  # fmt: skip
    """Write the tables as one Parquet file with the row groups of a single `write_table` of their concatenation
    (whole ROW_GROUP_SIZE groups, the rest last), holding less than a row group beyond the table at hand."""
    import pyarrow.parquet as pq

    path = str(path)
    if "://" not in path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Nullable as `_write` writes a validated table: the validation checks the non-null columns, the file does not
    # declare them.
    schema = pa.schema([field.with_nullable(True) for field in schema])
    pending = schema.empty_table()
    with _open_for_write(path) as handle, contextlib.ExitStack() as stack:
        writer = None

        def opened(rows: int) -> pq.ParquetWriter:
            nonlocal writer
            if writer is None:  # opened at the first write: a file of less than a row group gets a smaller filter
                options = _bloom_options(rows, schema.names) if bloom else None
                writer = stack.enter_context(pq.ParquetWriter(handle, schema, bloom_filter_options=options))
            return writer

        for table in tables:
            pending = pa.concat_tables([pending, table.select(schema.names).cast(schema)])
            whole = len(pending) // ROW_GROUP_SIZE * ROW_GROUP_SIZE
            if whole:
                opened(whole).write_table(pending.slice(0, whole), row_group_size=ROW_GROUP_SIZE)
                pending = pending.slice(whole)
        writer = opened(len(pending))
        if len(pending):
            writer.write_table(pending, row_group_size=ROW_GROUP_SIZE)


def _open_for_write(path: str) -> Any:
    if "://" in path:
        import fsspec

        return fsspec.open(path, "wb")
    return open(path, "wb")  # noqa: SIM115 - closed by the caller's `with`


def summarize_index(table: pa.Table) -> dict[str, Any]:
    """Counts a manifest records from its index: totals, drop reasons and per-split kept samples."""

    def counts(values: pa.ChunkedArray) -> Counter:
        return Counter({item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(values)
                        if item["values"].as_py() is not None})  # fmt: skip

    status = counts(table.column("status"))
    ok = pc.equal(table.column("status"), "ok")
    return {
        "counts": {"total": len(table), "ok": status["ok"], "dropped": status["dropped"]},
        "drop_reasons": dict(sorted(counts(table.column("drop_reason")).items())),
        "splits": dict(sorted(counts(table.filter(ok).column("split")).items())),
    }


# --------------------------------------------------------------------------- reading
def is_numeric(kind: pa.DataType) -> bool:
    """A column type with a range: a source column that `source_bounds`, a range filter or binning can use."""
    return pa.types.is_integer(kind) or pa.types.is_floating(kind)


def finite_or_none(value: Any) -> Any:
    """A value JSON can carry: a NaN or infinite float (a source list's score may be NaN) is None, no value."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def source_columns(registry: Registry, manifest: Manifest) -> list[pa.Field]:
    """The source list's columns `manifest`'s index carries (SOURCE_COLUMNS), typed as its index has them."""
    names = manifest.metadata.get(SOURCE_COLUMNS) or []
    if not names:
        return []
    with registry.open(manifest, INDEX_FILE) as handle:
        schema = pq.read_schema(handle)
    missing = [name for name in names if name not in schema.names]
    if missing:
        raise SampleIndexError(f"{manifest.ref}: its {INDEX_FILE} lacks the source column(s) {', '.join(missing)} "
                               f"its manifest names")
    return [schema.field(name).with_nullable(True) for name in names]


def has_layer(manifest: Manifest, relpath: str) -> bool:
    return any(entry.path == relpath for entry in manifest.files)


def parquet_format() -> ds.ParquetFileFormat:
    """How the dataset reads here (filtered lookups, whole-column reads) read Parquet: without Arrow's
    pre-buffering, whose cached row groups stay until the file's reader closes (apache/arrow#39808: a scan of a
    whole file held the compressed bytes of every column it read). Column chunks are read through an 8 MiB
    buffered stream instead: large sequential reads, which object storage wants too (as Ray Data, ray#62745)."""
    options = ds.ParquetFragmentScanOptions(pre_buffer=False, use_buffered_stream=True, buffer_size=8 << 20)
    return ds.ParquetFileFormat(default_fragment_scan_options=options)


def open_parquet(source: Any) -> pq.ParquetFile:
    """A Parquet file for reading a batch at a time (`iter_batches`) without pre-buffering: pyarrow's default
    (pre_buffer=True) keeps every row group it has read cached until the file closes (apache/arrow#39808), so
    a batch-at-a-time read of a whole file held the compressed bytes of its columns (measured: 104 MiB for
    2 columns of 30M rows; ~5 MiB without)."""
    return pq.ParquetFile(source, pre_buffer=False, buffer_size=8 << 20)


def iter_parquet(source: Any, columns: list[str], batch_rows: int = 65536, *,
                 project: dict[str, ds.Expression] | None = None,
                 where: ds.Expression | None = None) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """A Parquet file `columns` at a time, in file order, holding about one batch: for scans over files larger
    than memory. The dataset scanner reads ahead of a slow consumer without bound (measured: a 30M-row,
    2-column scan whose consumer took 10 ms a batch held ~300 MiB, most of the decoded file); this reads a batch
    when asked (~5 MiB). `project` (name -> expression over `columns`) and `where` are evaluated on each batch.
    """
    file = open_parquet(source)
    for batch in file.iter_batches(batch_size=batch_rows, columns=columns):
        if project is None and where is None:
            yield batch
            continue
        table = ds.dataset(pa.Table.from_batches([batch])).to_table(columns=project or columns, filter=where)
        yield from table.to_batches()


def read_ahead(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """The items of `items`, produced in a thread up to `depth` ahead of the consumer: reading, decoding and
    projecting the next batches of a Parquet file overlap the consumer's work on this one (Arrow releases the GIL
    in both). The thread stops, closing `items`, as soon as the consumer stops; an error is raised to it."""
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    break
            else:
                put((end, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put((end, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name="read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, error = box.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        thread.join()


def open_registry_file(registry: Registry, path: str) -> Any:
    """A file of `registry` (`path` from `registry.path_of`) for seeks and reads: Arrow's own file on a local
    registry, the registry's filesystem's otherwise."""
    return pa.OSFile(path) if registry.is_local else registry.fs.open(path, "rb")


def iter_registry_parquet(registry: Registry, path: str, columns: list[str], batch_rows: int = 65536,
                          **options: Any) -> Iterator[pa.RecordBatch]:  # fmt: skip
    """`iter_parquet` over a file of `registry` (`path` from `registry.path_of`): read by Arrow's own file on a
    local registry, through the registry's filesystem otherwise."""
    if registry.is_local:
        yield from iter_parquet(path, columns, batch_rows, **options)
        return
    with registry.fs.open(path, "rb") as handle:
        yield from iter_parquet(handle, columns, batch_rows, **options)


def bool_mask(values: pa.Array | pa.ChunkedArray) -> Any:
    """A boolean column as a numpy array, null as False (a comparison with a null value)."""
    import numpy as np

    return np.asarray(pc.fill_null(values, False).to_numpy(zero_copy_only=False), dtype=bool)


def _dataset(registry: Registry, manifest: Manifest, relpath: str) -> ds.Dataset:
    if not has_layer(manifest, relpath):
        raise NotFoundError(f"{manifest.ref} has no {relpath} (not a dataset version with a per-sample index)")
    path = registry.path_of(manifest, relpath)
    if registry.is_local:
        return ds.dataset(path, format=parquet_format())
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return ds.dataset(path, format=parquet_format(), filesystem=PyFileSystem(FSSpecHandler(registry.fs)))


def read_index(registry: Registry, manifest: Manifest, columns: list[str] | None = None) -> pa.Table:
    """The whole index of a version (or some of its columns)."""
    dataset = _dataset(registry, manifest, INDEX_FILE)
    _check_columns(dataset.schema, columns or [], manifest, INDEX_FILE)
    return dataset.to_table(columns=columns)


def scan_index(registry: Registry, manifest: Manifest, columns: list[str] | None = None,
               batch_rows: int = 65536) -> Iterator[pa.RecordBatch]:
    """The index of a version a batch at a time, in file order: for work over an index larger than memory."""
    dataset = _dataset(registry, manifest, INDEX_FILE)
    _check_columns(dataset.schema, columns or [], manifest, INDEX_FILE)
    yield from iter_registry_parquet(registry, registry.path_of(manifest, INDEX_FILE), columns or dataset.schema.names,
                                     batch_rows)  # fmt: skip


def check_index_columns(schema: pa.Schema, manifest: Manifest, columns: list[str]) -> None:
    """`manifest`'s index (its `schema`, from a footer already read) has `columns`, or a SampleIndexError names
    the first it lacks."""
    _check_columns(schema, columns, manifest, INDEX_FILE)


def read_texts(registry: Registry, manifest: Manifest, columns: list[str] | None = None,
               keys: list[str] | None = None) -> pa.Table | None:
    """The derived texts layer (CapFilt candidates and decisions), or None when the version has none."""
    if not has_layer(manifest, TEXTS_FILE):
        return None
    dataset = _dataset(registry, manifest, TEXTS_FILE)
    _check_columns(dataset.schema, columns or [], manifest, TEXTS_FILE)
    expression = pc.field("key").isin(pa.array(keys, pa.string())) if keys is not None else None
    return dataset.to_table(columns=columns, filter=expression)


def _check_columns(schema: pa.Schema, columns: Iterable[str], manifest: Manifest, relpath: str) -> None:
    unknown = [c for c in columns if c not in schema.names]
    if unknown:
        raise SampleIndexError(
            f"{manifest.ref}/{relpath} has no column {unknown[0]!r} (columns: {', '.join(schema.names)})"
        )


def _literal(schema: pa.Schema, column: str, value: Any) -> Any:
    """A `--where` value as the column's type: '32' -> 32 for an int column; '' or None -> null."""
    if value is None or not isinstance(value, str):
        return value
    if value in ("", "null", "None"):
        return None
    column_type = schema.field(column).type
    parser = _PARSERS.get(column_type)
    if parser is None:
        return value
    try:
        return parser(value)
    except (ValueError, KeyError) as error:
        raise SampleIndexError(f"where {column} {value!r}: not a valid {column_type} value") from error


def build_filter(schema: pa.Schema, where: dict[str, Any] | None, text: str | None,
                 text_columns: tuple[str, ...] = ("caption", "raw_caption", "url")) -> pc.Expression | None:
    """An Arrow filter: every `where` column equals its value (a list means any of; None means null) or, where
    its value is a `Compare` (or a list of them, all holding), compares so; and, with `text`, any text column
    contains it (case-insensitive)."""
    expression: pc.Expression | None = None

    def both(term: pc.Expression) -> None:
        nonlocal expression
        expression = term if expression is None else (expression & term)

    for column, value in (where or {}).items():
        if column not in schema.names:
            raise SampleIndexError(f"where: unknown column {column!r} (columns: {', '.join(schema.names)})")
        comparisons = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(item, Compare) for item in comparisons):
            if not all(isinstance(item, Compare) for item in comparisons):
                raise SampleIndexError(f"where: {column!r} both equals and compares: give one or the other")
            for item in comparisons:
                literal = _literal(schema, column, item.value)
                if literal is None:
                    raise SampleIndexError(f"where {column}{item.op}: a comparison needs a value")
                both(COMPARISONS[item.op](pc.field(column), literal))
        elif isinstance(value, (list, tuple, set)):
            values = [_literal(schema, column, v) for v in value]
            both(pc.field(column).isin(pa.array(values, schema.field(column).type)))
        else:
            literal = _literal(schema, column, value)
            both(pc.field(column).is_null() if literal is None else (pc.field(column) == literal))
    if text:
        terms = [pc.match_substring(pc.field(c), text, ignore_case=True) for c in text_columns if c in schema.names]
        if terms:
            any_term = terms[0]
            for term in terms[1:]:
                any_term = any_term | term
            both(any_term)
    return expression


def query_samples(registry: Registry, manifest: Manifest, where: dict[str, Any] | None = None,
                  text: str | None = None, limit: int = 50, offset: int = 0,
                  columns: list[str] | None = None) -> tuple[pa.Table, int]:
    """One page of matching samples and the number of matches, without loading the whole index.

    The scan stops once `offset + limit` matching rows are read, so the first pages of a huge index are
    cheap; `total` costs one filtered pass over the needed columns.
    """
    if limit < 0 or offset < 0:
        raise SampleIndexError(f"limit and offset must be >= 0 (got limit={limit}, offset={offset})")
    dataset = _dataset(registry, manifest, INDEX_FILE)
    _check_columns(dataset.schema, columns or [], manifest, INDEX_FILE)
    expression = build_filter(dataset.schema, where, text)
    total = dataset.count_rows(filter=expression)
    batches, skip, wanted = [], offset, limit
    if wanted:
        scanner = dataset.scanner(columns=columns, filter=expression, batch_size=8192)
        for batch in scanner.to_batches():
            if skip >= batch.num_rows:
                skip -= batch.num_rows
                continue
            batch = batch.slice(skip, wanted)
            skip = 0
            batches.append(batch)
            wanted -= batch.num_rows
            if wanted <= 0:
                break
    schema = dataset.schema if columns is None else pa.schema([dataset.schema.field(c) for c in columns])
    page = pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
    return page, total


def get_sample(registry: Registry, manifest: Manifest, key: str) -> dict[str, Any]:
    """One sample's index row (plus its texts when the version has the derived layer)."""
    page, total = query_samples(registry, manifest, where={"key": key}, limit=1)
    if not total:
        raise NotFoundError(f"{manifest.ref} has no sample with key {key!r}")
    row = page.to_pylist()[0]
    texts = read_texts(registry, manifest, keys=[key])
    if texts is not None:
        row["texts"] = texts.to_pylist()
    return row
