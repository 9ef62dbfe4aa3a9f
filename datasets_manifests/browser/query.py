"""Lazy Parquet reads behind the manifest browser: sample pages, filters over both layers, score histograms.

A version's per-sample index (`index.parquet`: one row per image) and, for CapFilt versions, its `texts.parquet`
(one row per caption: web or synthetic, ITM score, kept, drop reason) can hold millions of rows, so nothing here
loads a whole table per request: an unfiltered page reads only the row groups it covers (footer metadata gives
the offsets); a filter reads only its columns, a batch at a time (the texts walked beside the index, in the
order CapFilt writes them), and keeps which rows matched, so its pages are rows read by number; a page's texts
are read by position where the index says where they are. The files and their contract are
`datasets_manifests.index`'s; its `query_samples` filters the index alone, while the grid also filters on the
texts layer (source, ITM score, decision, text search over synthetic captions), hence this module.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from datasets_manifests.bloom import row_groups_to_read, value_hashes
from datasets_manifests.index import (INDEX_FILE, SOURCE_COLUMNS, TEXTS_FILE, TEXTS_POSITION, bool_mask, finite_or_none,
                                      is_numeric, iter_registry_parquet, open_registry_file, parquet_format,
                                      read_ahead)
from datasets_manifests.browser.jobs import BackgroundAnswers, Progress
from datasets_manifests.manifest import Manifest
from datasets_manifests.registry import OutsideRegistryError, Registry

# Columns a sample card shows; read with projection so caption-heavy pages stay small.
SAMPLE_COLUMNS = ("key", "url", "image_sha256", "width", "height", "caption", "raw_caption", "caption_source",
                  "split", "shard", "jpg_offset", "jpg_bytes", "status", "drop_reason")
TEXT_COLUMNS = ("key", "text", "source", "itm_score", "kept", "drop_reason")
SCORE_BINS = 20
SCAN_BATCH_ROWS = 1 << 18  # rows read at a time by the histograms and the filtered sample pages
MATCHES_KEPT = 4  # filters per version whose matching rows are kept (16 MB each at 129M samples)
# A caption filter over a version whose index places its texts (`texts_row`, `texts_count`) walks ranges of this
# many index rows in parallel, in up to this many threads (a range holds ~3 texts per row while it is walked).
RANGE_ROWS = SCAN_BATCH_ROWS
RANGE_WORKERS = min(8, os.cpu_count() or 1)
log = logging.getLogger(__name__)


class QueryError(Exception):
    """A request this version cannot answer (bad filter, no index); `status` is the HTTP status to return."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SampleFilter:
    """What the sample grid asks for. Empty strings and None mean "no condition"."""

    q: str = ""  # substring of the web caption, raw caption, any text, or the exact key
    source: str = ""  # "web" | "synthetic": the image has a caption from this source (matching the rest)
    min_score: float | None = None  # ITM score range of that caption
    max_score: float | None = None
    decision: str = ""  # "kept" | "dropped": the caption's (or, without texts, the image's) decision
    split: str = ""
    column: str = ""  # a numeric source column the version carries (LAION's similarity) and its range
    column_min: float | None = None
    column_max: float | None = None

    def __post_init__(self) -> None:
        if self.source not in ("", "web", "synthetic"):
            raise QueryError(f"source must be 'web' or 'synthetic', not {self.source!r}")
        if self.decision not in ("", "kept", "dropped"):
            raise QueryError(f"decision must be 'kept' or 'dropped', not {self.decision!r}")
        if self.min_score is not None and self.max_score is not None and self.min_score > self.max_score:
            raise QueryError(f"min_score {self.min_score} is above max_score {self.max_score}")
        ranged = self.column_min is not None or self.column_max is not None
        if ranged and not self.column:
            raise QueryError("column_min / column_max bound a source column: name it (column=...)")
        if self.column and not ranged:
            raise QueryError(f"column={self.column} without column_min or column_max: give its range")
        if self.column_min is not None and self.column_max is not None and self.column_min > self.column_max:
            raise QueryError(f"column_min {self.column_min} is above column_max {self.column_max}")

    @property
    def empty(self) -> bool:
        return self == SampleFilter()

    @property
    def text_level(self) -> bool:
        return bool(self.source or self.decision) or self.min_score is not None or self.max_score is not None


class VersionData:
    """Lazy handles on the index and texts Parquet files of one version (footers read once)."""

    def __init__(self, registry: Registry, manifest: Manifest) -> None:
        self.registry, self.manifest = registry, manifest
        self.index_path = _find_parquet(manifest, INDEX_FILE)
        self.texts_path = _find_parquet(manifest, TEXTS_FILE)
        self._datasets: dict[str, ds.Dataset] = {}
        self._metadata: dict[str, pq.FileMetaData] = {}
        self._lock = threading.Lock()
        self._histograms: BackgroundAnswers[dict[str, Any]] = BackgroundAnswers(1)
        self._matches: BackgroundAnswers[Matches] = BackgroundAnswers(MATCHES_KEPT)  # SampleFilter -> Matches

    @property
    def has_index(self) -> bool:
        return self.index_path is not None

    @property
    def has_texts(self) -> bool:
        return self.texts_path is not None

    def _require_index(self) -> str:
        if self.index_path is None:
            raise QueryError(f"{self.manifest.ref} has no per-sample index ({INDEX_FILE})", status=404)
        return self.index_path

    def dataset(self, relpath: str) -> ds.Dataset:
        with self._lock:
            if relpath not in self._datasets:
                self._datasets[relpath] = ds.dataset(self._location(relpath), format=parquet_format(),
                                                     filesystem=None if self.registry.is_local else self.registry.fs)
            return self._datasets[relpath]

    def metadata(self, relpath: str) -> pq.FileMetaData:
        """The Parquet footer (row groups, row counts, schema), read once per version."""
        with self._lock:
            if relpath not in self._metadata:
                self._metadata[relpath] = pq.read_metadata(self._location(relpath),
                                                           filesystem=None if self.registry.is_local else self.registry.fs)
            return self._metadata[relpath]

    def read_rows(self, relpath: str, groups: list[int], skip: int, limit: int, columns: list[str],
                  batch_rows: int = 2048) -> pa.Table:  # fmt: skip
        """`limit` rows after skipping `skip` rows of the given row groups, decoding `batch_rows` at a time: the
        first page of a 64k-row group decodes a few thousand rows, not the whole group."""
        # A fresh reader per call (a ParquetFile is not shared across request threads); the footer is reused.
        location, metadata = self._location(relpath), self.metadata(relpath)
        handle = None if self.registry.is_local else self.registry.fs.open(location, "rb")
        try:
            reader = pq.ParquetFile(location if handle is None else handle, metadata=metadata)
            batches, wanted = [], limit
            for batch in reader.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
                if skip >= batch.num_rows:
                    skip -= batch.num_rows
                    continue
                part = batch.slice(skip, wanted)
                skip, wanted = 0, wanted - part.num_rows
                batches.append(part)
                if wanted <= 0:
                    break
            schema = pa.schema([metadata.schema.to_arrow_schema().field(c) for c in columns])
            return pa.Table.from_batches(batches, schema=schema) if batches else schema.empty_table()
        finally:
            if handle is not None:
                handle.close()

    def _location(self, relpath: str) -> str:
        # Every Parquet read goes through here: `path_of` refuses unlisted files and symlinks out of the registry.
        try:
            return self.registry.path_of(self.manifest, relpath)
        except OutsideRegistryError as error:
            raise QueryError(str(error), status=403) from error
        except Exception as error:  # noqa: BLE001 - the message names the version and file
            raise QueryError(str(error), status=404) from error

    def index_columns(self) -> list[str]:
        return self.dataset(self._require_index()).schema.names

    def summary(self) -> dict[str, Any]:
        """Row counts and columns from the Parquet footers only (no data pages read)."""
        out: dict[str, Any] = {"index": None, "texts": None}
        for label, path in (("index", self.index_path), ("texts", self.texts_path)):
            if path is None:
                continue
            try:
                meta = self.metadata(path)
                out[label] = {"path": path, "rows": meta.num_rows, "row_groups": meta.num_row_groups,
                              "columns": meta.schema.to_arrow_schema().names}
            except Exception as error:  # noqa: BLE001 - a broken file is shown, not fatal for the page
                out[label] = {"path": path, "error": f"cannot read {path}: {error}"}
        return out

    def source_columns(self) -> list[dict[str, Any]]:
        """The source list's columns the version carries, typed (the sample grid offers a range on numeric ones)."""
        try:
            fields = self._source_fields() if self.has_index else []
        except Exception:  # noqa: BLE001 - a broken index is shown by `summary`; the page still opens
            return []
        return [{"name": field.name, "type": str(field.type), "numeric": is_numeric(field.type)} for field in fields]

    def _source_fields(self) -> list[pa.Field]:
        """The source list's columns the version carries (`SOURCE_COLUMNS`), as its index types them."""
        schema = self.metadata(self._require_index()).schema.to_arrow_schema()
        return [schema.field(name) for name in self.manifest.metadata.get(SOURCE_COLUMNS) or []
                if name in schema.names]  # fmt: skip

    # ------------------------------------------------------------------ samples
    def query_samples(self, where: SampleFilter, limit: int, offset: int,
                      wait_s: float | None = None) -> tuple[list[dict[str, Any]], int]:  # fmt: skip
        """One page of samples (index rows + their texts) matching `where`, and the total number of matches.

        A filter's matches are computed in a background thread and kept; `wait_s` bounds the wait for them
        (None: until they are there), after which `jobs.Pending` says how far the scan is."""
        index_path = self._require_index()
        index = self.dataset(index_path)
        # The source list's columns the version carries (LAION's similarity, DataComp's uid): on the card too.
        carried = [c for c in self.manifest.metadata.get(SOURCE_COLUMNS) or [] if c in index.schema.names]
        columns = [c for c in (*SAMPLE_COLUMNS, *TEXTS_POSITION, *carried) if c in index.schema.names]
        if where.empty:
            total = self.metadata(index_path).num_rows
            page = self._slice_rows(index_path, offset, limit, columns)
        else:
            matches = self._matches.get(where, lambda progress: self._find_matches(where, index.schema.names, progress),
                                        what=f"filtering {self.manifest.ref}", wait_s=wait_s,
                                        total=self.metadata(index_path).num_rows)  # fmt: skip
            total = matches.total
            page = self.rows_at(index_path, matches.rows(offset, limit), columns)
        rows = page.to_pylist()
        texts = self.texts_of(rows)
        for row in rows:
            row["texts"] = texts.get(row["key"], [])
            row["source_columns"] = {name: finite_or_none(row.pop(name)) for name in carried}  # NaN: not JSON
        return rows, total

    def _find_matches(self, where: SampleFilter, names: list[str], progress: Progress) -> Matches:
        """Which index rows match `where` (kept per filter: every further page, and the total, come from it)."""
        ranged = True
        while True:
            try:
                return Matches.of(self._match_masks(where, names, ranged), progress)
            except _PositionsDisagree as error:
                log.warning("%s: %s; walking the texts in one pass instead", self.manifest.ref, error)
                ranged = False
            except _TextsOutOfOrder as error:
                log.warning("%s: %s; filtering through a key set instead (memory grows with the matches)",
                            self.manifest.ref, error)
                progress.done = 0  # the scan starts again
                return Matches.of(self._key_set_masks(where, names), progress)
            progress.done = 0

    def rows_at(self, relpath: str, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """The rows numbered `rows` (ascending) of a Parquet file, reading only the row groups that hold them."""
        meta = self.metadata(relpath)
        ends = np.cumsum([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        groups = np.searchsorted(ends, rows, side="right")
        pieces = []
        for group in np.unique(groups):
            inside = rows[groups == group] - (ends[group] - meta.row_group(int(group)).num_rows)
            span = self.read_rows(relpath, [int(group)], int(inside[0]), int(inside[-1] - inside[0] + 1), columns)
            pieces.append(span.take(pa.array(inside - inside[0])))
        schema = pa.schema([meta.schema.to_arrow_schema().field(c) for c in columns])
        return pa.concat_tables(pieces) if pieces else schema.empty_table()

    def _match_masks(self, where: SampleFilter, names: list[str], ranged: bool = True) -> Iterator[np.ndarray]:
        """Which rows of each index batch match `where`, a batch at a time in file order.

        With conditions on the texts, texts.parquet is walked beside the index instead of collecting the keys of
        every matching text (at 129M samples, ~300M texts: several GB when a filter matches most of them). CapFilt
        writes each sample's texts together and in the index's order, so each index batch needs only the text
        groups that fall in it; a version whose texts are not in that order raises `_TextsOutOfOrder`. Where the
        index says where each sample's texts are, ranges of it are walked in parallel (`_ranged_masks`; `ranged`
        False: in one pass)."""
        index_path = self._require_index()
        needs_texts = self.has_texts and (where.text_level or bool(where.q))
        if not needs_texts:
            for batch in self._batches(index_path, self._index_filter_columns(where, names),
                                       project={"match": self._index_expression(where, names)}):  # fmt: skip
                yield bool_mask(batch.column("match"))
            return
        if ranged and RANGE_WORKERS > 1 and set(TEXTS_POSITION) <= set(names) and \
                self.metadata(index_path).num_rows > RANGE_ROWS:  # fmt: skip
            yield from self._ranged_masks(where, names)
            return
        index_columns, projection, text_projection = self._walk_projections(where, names)
        groups = _TextGroups(self._batches(self.texts_path, _text_filter_columns(where), project=text_projection))
        for batch in self._batches(index_path, index_columns, project=projection):
            yield _walk_match(where, batch, groups.flags_for(batch.column("key")))
        groups.check_all_placed()

    def _walk_projections(self, where: SampleFilter, names: list[str]) -> tuple[list[str], dict, dict]:
        """What the walk beside the texts reads: index columns, their projection (key, the index's own conditions,
        q on the web captions) and the texts' projection (key, the text conditions, q on the texts)."""
        index_only = SampleFilter(split=where.split, column=where.column, column_min=where.column_min,
                                  column_max=where.column_max)  # the conditions on the index's own columns
        projection = {"key": ds.field("key"), "ok": self._index_expression(index_only, names),
                      "q": self._index_q_expression(where.q, names)}
        text_projection = {"key": ds.field("key"), "level": self._text_expression(where),
                           "q": pc.match_substring(ds.field("text"), where.q, ignore_case=True) if where.q
                           else ds.scalar(False)}  # fmt: skip
        return self._index_filter_columns(where, names), projection, text_projection

    def _ranged_masks(self, where: SampleFilter, names: list[str]) -> Iterator[np.ndarray]:
        """`_match_masks` over ranges of RANGE_ROWS index rows walked in parallel threads (Arrow's reads and
        kernels release the GIL): each range reads the texts its rows' `texts_row` / `texts_count` place, so the
        ranges are independent. Computed a few ranges ahead of the consumer; the ranges' texts must tile
        texts.parquet, or `_PositionsDisagree` is raised (and `_find_matches` walks them in one pass instead)."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor
        from itertools import islice

        starts = iter(range(0, self.metadata(self._require_index()).num_rows, RANGE_ROWS))
        projections = self._walk_projections(where, names)  # the same for every range
        with ThreadPoolExecutor(RANGE_WORKERS, thread_name_prefix="browser-range") as pool:
            try:
                running = deque((start, pool.submit(self._range_mask, where, projections, start))
                                for start in islice(starts, RANGE_WORKERS + 1))  # fmt: skip
                texts_end = 0  # the texts rows placed so far: the next range's texts must start here
                while running:
                    start, future = running.popleft()
                    mask, (first, end) = future.result()
                    running.extend((following, pool.submit(self._range_mask, where, projections, following))
                                   for following in islice(starts, 1))  # fmt: skip
                    if first is not None:
                        if first != texts_end:
                            raise _PositionsDisagree(f"index rows from {start:,} place their texts at row {first:,} "
                                                     f"of {TEXTS_FILE}, where row {texts_end:,} is next")
                        texts_end = end
                    yield mask
                texts_rows = self.metadata(self.texts_path).num_rows
                if texts_end != texts_rows:
                    raise _PositionsDisagree(f"the index places {texts_end:,} texts; {TEXTS_FILE} has {texts_rows:,}")
            finally:
                pool.shutdown(cancel_futures=True)  # a consumer that stops (an abandoned filter) stops the ranges

    def _range_mask(self, where: SampleFilter, projections: tuple[list[str], dict, dict],
                    start: int) -> tuple[np.ndarray, tuple]:  # fmt: skip
        """The mask of index rows [start, start + RANGE_ROWS) and the texts rows [first, end) they place theirs in
        ((None, None) when they have none); `projections` from `_walk_projections`."""
        index_columns, projection, text_projection = projections
        rows = self._slice_rows(self._require_index(), start, RANGE_ROWS, [*index_columns, *TEXTS_POSITION],
                                batch_rows=RANGE_ROWS)  # fmt: skip
        counts = _numbers(rows.column(TEXTS_POSITION[1]).fill_null(0), np.int64)
        placed = _numbers(rows.column(TEXTS_POSITION[0]).fill_null(0), np.int64)[counts > 0]
        batch = ds.dataset(rows.select(index_columns)).to_table(columns=projection)
        if not len(placed):
            return _walk_match(where, batch, np.zeros((len(rows), 2), dtype=bool)), (None, None)
        ends = placed + counts[counts > 0]
        if (placed[1:] != ends[:-1]).any():
            raise _PositionsDisagree(f"index rows from {start:,} do not place their texts one after the other")
        first, end = int(placed[0]), int(ends[-1])
        texts = self._slice_rows(self.texts_path, first, end - first, _text_filter_columns(where),
                                 batch_rows=4 * RANGE_ROWS)  # fmt: skip
        groups = _TextGroups(iter(ds.dataset(texts).to_table(columns=text_projection).to_batches()))
        try:
            found = groups.flags_for(batch.column("key").combine_chunks())
            groups.check_all_placed()
        except _TextsOutOfOrder as error:
            raise _PositionsDisagree(f"index rows from {start:,}: {error}") from None
        return _walk_match(where, batch, found), (first, end)

    def _slice_rows(self, relpath: str, offset: int, limit: int, columns: list[str],
                    batch_rows: int = 2048) -> pa.Table:  # fmt: skip
        """Rows [offset, offset+limit) reading only the row groups that hold them (`read_rows`)."""
        meta = self.metadata(relpath)
        groups, start, first_start = [], 0, 0
        for number in range(meta.num_row_groups):
            rows = meta.row_group(number).num_rows
            if start + rows > offset and start < offset + limit:
                if not groups:
                    first_start = start
                groups.append(number)
            start += rows
        if not groups:
            return meta.schema.to_arrow_schema().empty_table().select(columns)
        return self.read_rows(relpath, groups, offset - first_start, limit, columns, batch_rows)

    def _key_set_masks(self, where: SampleFilter, names: list[str]) -> Iterator[np.ndarray]:
        """`_match_masks` with the texts' conditions turned into a set of every matching text's key: for versions
        whose texts are not in the index's order. Arrow's scanner evaluates the `isin` with one hash table for the
        file (evaluated a batch at a time, it would rebuild it for every batch)."""
        scanner = self.dataset(self._require_index()).scanner(columns={"match": self._index_expression(where, names)},
                                                              batch_size=SCAN_BATCH_ROWS)  # fmt: skip
        for batch in scanner.to_batches():
            yield bool_mask(batch.column(0))

    def _index_filter_columns(self, where: SampleFilter, names: list[str]) -> list[str]:
        """The index columns `where`'s conditions on the index read."""
        wanted = {"key"} | ({"split"} if where.split else set()) | ({"caption", "raw_caption"} if where.q else set())
        wanted |= {where.column} if where.column else set()
        if where.text_level and not self.has_texts:
            wanted |= {"status", "caption_source"}
        return [name for name in names if name in wanted]

    def _index_expression(self, where: SampleFilter, names: list[str]) -> ds.Expression:
        """`where` as one predicate on the index; conditions on the texts become a key set (`isin`), which holds
        every matching key: used for versions whose texts are not in the index's order (`_key_set_masks`)."""
        conditions: list[ds.Expression] = []
        candidates = None
        if where.column:
            conditions.append(self._column_range(where))
        if where.split:
            conditions.append(ds.field("split") == where.split)
            if where.text_level and self.has_texts:
                # A split is usually a small slice (val/test): look for texts of its keys only, so the key set
                # handed to the index is small too.
                split_keys = self.dataset(self.index_path).to_table(columns=["key"], filter=conditions[0])
                candidates = split_keys.column("key").combine_chunks()
        if where.text_level:
            if self.has_texts:
                conditions.append(ds.field("key").isin(self._text_keys(where, candidates)))
            else:
                if where.min_score is not None or where.max_score is not None:
                    raise QueryError(f"{self.manifest.ref} has no ITM scores ({TEXTS_FILE} is absent)")
                if where.decision:
                    conditions.append(ds.field("status") == ("ok" if where.decision == "kept" else "dropped"))
                if where.source and "caption_source" in names:
                    conditions.append(ds.field("caption_source") == where.source)
        if where.q:
            matches = self._index_q_expression(where.q, names)
            if self.has_texts:
                text_expression = pc.match_substring(ds.field("text"), where.q, ignore_case=True)
                text_keys = self.dataset(self.texts_path).to_table(columns=["key"], filter=text_expression)
                matches = matches | ds.field("key").isin(text_keys.column("key").combine_chunks())
            conditions.append(matches)
        expression = ds.scalar(True)
        for condition in conditions:
            expression = expression & condition
        return expression

    def _column_range(self, where: SampleFilter) -> ds.Expression:
        """`where`'s range on a numeric source column; a sample without a value for it is outside any range."""
        fields = {field.name: field for field in self._source_fields()}
        field = fields.get(where.column)
        if field is None:
            carried = ", ".join(fields) or "none"
            raise QueryError(f"{self.manifest.ref} carries no source column {where.column!r} (it carries: {carried})")
        if not is_numeric(field.type):
            raise QueryError(f"{self.manifest.ref}: source column {where.column!r} is {field.type}, not a number: "
                             "it has no range")
        condition = ds.field(where.column).is_valid()
        if where.column_min is not None:
            condition = condition & (ds.field(where.column) >= where.column_min)
        if where.column_max is not None:
            condition = condition & (ds.field(where.column) <= where.column_max)
        return condition

    @staticmethod
    def _index_q_expression(q: str, names: list[str]) -> ds.Expression:
        """Text search on the index's own columns: the exact key, or a substring of the (raw) caption."""
        if not q:
            return ds.scalar(False)
        matches = ds.field("key") == q
        for column in ("caption", "raw_caption"):
            if column in names:
                matches = matches | pc.match_substring(ds.field(column), q, ignore_case=True)
        return matches

    @staticmethod
    def _text_expression(where: SampleFilter) -> ds.Expression:
        """The text-level conditions on one caption, all together (True when there are none)."""
        expression = ds.scalar(True)
        if where.source:
            expression = expression & (ds.field("source") == where.source)
        if where.min_score is not None:
            expression = expression & (ds.field("itm_score") >= where.min_score)
        if where.max_score is not None:
            expression = expression & (ds.field("itm_score") <= where.max_score)
        if where.decision:
            expression = expression & (ds.field("kept") == (where.decision == "kept"))
        return expression

    def _text_keys(self, where: SampleFilter, candidates: pa.Array | None = None) -> pa.Array:
        """Keys (among `candidates`, if given) with a caption satisfying all the text-level conditions together."""
        expression = self._text_expression(where)
        if candidates is not None:
            expression = ds.field("key").isin(candidates) & expression
        table = self.dataset(self.texts_path).to_table(columns=["key"], filter=expression)
        # Duplicates are fine: the isin lookup builds its own hash set (a separate unique() costs ~40% more).
        return table.column("key").combine_chunks()

    def texts_of(self, rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """The captions of some index rows, by key: read by position where the index says where they are
        (`TEXTS_POSITION`, CapFilt writes it: a page reads a few row groups of texts.parquet), else by key (a
        scan of texts.parquet, which its row groups' key statistics prune only when the keys are sorted).
        The position columns are taken out of `rows`: they say where to read, not what to show."""
        positions = [[row.pop(column, None) for column in TEXTS_POSITION] for row in rows]
        if not self.has_texts or not rows:
            return {}
        if all(value is not None for position in positions for value in position):
            starts, counts = np.array(positions, dtype=np.int64).reshape(-1, 2).T
            texts_rows = self.metadata(self.texts_path).num_rows
            if (starts >= 0).all() and (counts >= 0).all() and (starts + counts <= texts_rows).all():
                numbers = np.concatenate([np.arange(start, start + count) for start, count in zip(starts, counts)])
                expected = [row["key"] for row, count in zip(rows, counts) for _ in range(count)]
                order = np.argsort(numbers, kind="stable")
                if (np.diff(numbers[order]) > 0).all():  # no text claimed twice
                    table = self.rows_at(self.texts_path, numbers[order], self._text_columns())
                    keys = table.column("key").to_pylist()
                    if all(keys[position] == expected[index] for position, index in enumerate(order)):
                        return _grouped_texts(table)
            log.warning("%s: texts_row/texts_count do not point at the samples' texts; looking them up by key",
                        self.manifest.ref)
        return self.texts_for([row["key"] for row in rows])

    def texts_for(self, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
        """The captions of some keys, web first, then synthetic by descending score."""
        if not self.has_texts or not keys:
            return {}
        table = self.dataset(self.texts_path).to_table(filter=ds.field("key").isin(pa.array(keys, pa.string())),
                                                       columns=self._text_columns())  # fmt: skip
        return _grouped_texts(table)

    def _text_columns(self) -> list[str]:
        names = self.dataset(self.texts_path).schema.names
        return [c for c in TEXT_COLUMNS if c in names] + [c for c in names if c not in TEXT_COLUMNS]

    def locate(self, key: str) -> dict[str, Any] | None:
        """Shard path and `.jpg` byte range of one key (the index's row groups that may hold it, filtered)."""
        index_path = self._require_index()
        index = self.dataset(index_path)
        columns = [c for c in ("key", "shard", "jpg_offset", "jpg_bytes", "drop_reason") if c in index.schema.names]
        if "shard" not in columns:
            raise QueryError(f"{self.manifest.ref}: index has no 'shard' column, cannot find images", status=404)
        groups = self._row_groups_that_may_hold(index_path, "key", key)
        if not groups:
            return None
        # Only the row groups whose Bloom filters may hold the key: a CapFilt index lists its keys shuffled, so the
        # row groups' min/max statistics alone leave every one to read (an index without filters: every one still).
        fragment = next(iter(index.get_fragments())).subset(row_group_ids=groups)
        rows = fragment.to_table(schema=index.schema, columns=columns, filter=ds.field("key") == key).to_pylist()
        return rows[0] if rows else None

    def _row_groups_that_may_hold(self, relpath: str, column: str, value: str) -> list[int]:
        with open_registry_file(self.registry, self._location(relpath)) as handle:
            return row_groups_to_read(self.metadata(relpath), handle, {column: value_hashes([value])})

    # ------------------------------------------------------------------ histograms
    def histograms(self, wait_s: float | None = None) -> dict[str, Any]:
        """Score histograms per (source, decision) from texts; size and caption-length histograms from the index.
        Computed once, in a background thread; `wait_s` as in `query_samples`."""
        rows = sum(self.metadata(path).num_rows for path in (self.texts_path, self.index_path) if path is not None)
        return self._histograms.get("histograms", self._compute_histograms, what=f"histograms of {self.manifest.ref}",
                                    total=rows, wait_s=wait_s)  # fmt: skip

    def _compute_histograms(self, progress: Progress) -> dict[str, Any]:
        """Read a batch at a time: a 129M-sample version's texts (~300M rows) and captions do not fit in memory.
        The score histograms have fixed edges and are summed batch by batch; the size and caption-length ones
        need the range first, so only their per-sample numbers are kept (12 bytes a sample)."""
        out: dict[str, Any] = {}
        if self.has_texts:
            edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
            labels = [(source, decision) for source in ("web", "synthetic") for decision in ("kept", "dropped")]
            counts = {label: np.zeros(SCORE_BINS, dtype=np.int64) for label in labels}
            total = 0
            for batch in self._batches(self.texts_path, ["source", "itm_score", "kept"]):
                progress.advance(batch.num_rows)
                scores = pc.fill_null(batch.column("itm_score"), -1.0).to_numpy().astype(float)  # null: no score
                kept = pc.fill_null(batch.column("kept"), False).to_numpy(zero_copy_only=False).astype(bool)
                total += int((scores >= 0.0).sum())
                for source in ("web", "synthetic"):
                    # Masks computed in Arrow: comparing millions of Python strings in numpy is ~100x slower.
                    is_source = pc.fill_null(pc.equal(batch.column("source"), source), False)
                    is_source = is_source.to_numpy(zero_copy_only=False).astype(bool) & (scores >= 0.0)
                    for decision, mask in (("kept", kept), ("dropped", ~kept)):
                        selected = scores[is_source & mask]
                        counts[source, decision] += np.histogram(np.clip(selected, 0.0, 1.0), bins=edges)[0]
            series = [{"label": f"{source} {decision}", "counts": counts[source, decision].tolist()}
                      for source, decision in labels]  # fmt: skip
            out["itm_score"] = {"edges": edges.round(4).tolist(), "series": series, "total": total}
        if self.has_index:
            names = self.dataset(self.index_path).schema.names
            sized, captioned = "width" in names and "height" in names, "caption" in names
            megapixels: list[np.ndarray] = []
            words: list[np.ndarray] = []
            columns = [c for c in ("width", "height", "caption") if c in names]
            for batch in self._batches(self.index_path, columns) if sized or captioned else ():
                progress.advance(batch.num_rows)
                if sized:
                    pixels = pc.multiply(pc.cast(batch.column("width"), pa.int64()), pc.cast(batch.column("height"), pa.int64()))
                    megapixels.append(_numbers(pc.divide(pc.cast(pixels, pa.float64()), 1e6), np.float64))
                if captioned:
                    counted = pc.add(pc.count_substring(pc.utf8_trim_whitespace(batch.column("caption")), " "), 1)
                    words.append(_numbers(counted, np.int32))
            if sized:
                out["megapixels"] = _histogram(megapixels, 20)
            if captioned:
                out["caption_words"] = _histogram(words, 20)
        return out

    def _batches(self, relpath: str, columns: list[str], where: ds.Expression | None = None,
                 project: dict[str, ds.Expression] | None = None) -> Iterator[pa.RecordBatch]:  # fmt: skip
        """The rows of a Parquet file (matching `where`; with `project`, its expressions over `columns`) a batch
        at a time, in file order, holding about one batch (`index.iter_parquet`)."""
        yield from read_ahead(iter_registry_parquet(self.registry, self._location(relpath), columns,
                                                   SCAN_BATCH_ROWS, project=project, where=where))  # fmt: skip


def _find_parquet(manifest: Manifest, basename: str) -> str | None:
    for entry in manifest.files:
        if entry.path.rsplit("/", 1)[-1] == basename:
            return entry.path
    return None


def _numbers(values: pa.Array | pa.ChunkedArray, dtype: Any) -> np.ndarray:
    return np.asarray(pc.drop_null(values).to_numpy(zero_copy_only=False), dtype=dtype)


def _histogram(chunks: list[np.ndarray], bins: int) -> dict[str, Any]:
    """Equal-width bins over the range of all chunks' values, counted a chunk at a time (the same counts as one
    np.histogram of their concatenation)."""
    chunks = [chunk for chunk in chunks if chunk.size]
    if not chunks:
        return {"edges": [], "counts": [], "total": 0}
    low, high = min(float(chunk.min()) for chunk in chunks), max(float(chunk.max()) for chunk in chunks)
    if high <= low:  # all values equal: one visible bar in the middle
        span = abs(low) * 0.1 or 1.0
        low, high = low - span, high + span
    counts = sum(np.histogram(chunk.astype(float), bins=bins, range=(low, high))[0] for chunk in chunks)
    edges = np.histogram_bin_edges(chunks[0].astype(float), bins=bins, range=(low, high))
    return {"edges": edges.round(4).tolist(), "counts": counts.tolist(),
            "total": sum(chunk.size for chunk in chunks)}  # fmt: skip


class _TextsOutOfOrder(Exception):
    """texts.parquet does not list each key's texts together and in the index's order."""


class _PositionsDisagree(Exception):
    """The index's texts positions do not tile texts.parquet (a stale or damaged column): walk it in one pass."""


def _walk_match(where: SampleFilter, batch: pa.Table | pa.RecordBatch, found: np.ndarray) -> np.ndarray:
    """Which rows of an index batch (projected: key, ok, q) match `where`, given the flags of their texts
    (`_TextGroups.flags_for`: some text meets the text conditions / contains q)."""
    match = bool_mask(batch.column("ok"))
    if where.text_level:
        match &= found[:, 0]
    if where.q:
        match &= bool_mask(batch.column("q")) | found[:, 1]
    return match


class _TextGroups:
    """The texts of a version as runs of rows sharing a key, each with the OR of its rows' flag columns, handed
    out to the index batches they fall in (`flags_for`). Holds the runs of about one texts batch at a time."""

    def __init__(self, batches: Iterator[pa.RecordBatch]) -> None:
        self._runs = self._read_runs(batches)
        self._keys: pa.Array = pa.array([], pa.string())
        self._flags = np.zeros((0, 2), dtype=bool)

    @staticmethod
    def _read_runs(batches: Iterator[pa.RecordBatch]) -> Iterator[tuple[pa.Array, np.ndarray]]:
        """(run keys, OR of each run's flags) per texts batch; a run cut by a batch edge comes as two runs of the
        same key (both land on its row)."""
        for batch in batches:
            if batch.num_rows == 0:
                continue
            keys = batch.column("key")
            flags = np.stack([bool_mask(batch.column("level")), bool_mask(batch.column("q"))], axis=1)
            changed = bool_mask(pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1)))
            starts = np.flatnonzero(np.concatenate([[True], changed]))
            yield keys.take(pa.array(starts)), np.logical_or.reduceat(flags, starts, axis=0)

    def flags_for(self, keys: pa.Array) -> np.ndarray:
        """(len(keys), 2) flags of the runs whose keys are in this index batch: the runs up to the first one
        whose key the batch lacks (it belongs to a later batch, or `check_all_placed` finds it left over)."""
        flags = np.zeros((len(keys), 2), dtype=bool)
        cursor = 0  # where the next run is expected: right after the last one placed
        while True:
            if len(self._keys) == 0:
                run = next(self._runs, None)
                if run is None:
                    return flags
                self._keys, self._flags = run
            # Usually the next runs are the next rows, one to one (every CapFilt sample has texts): a comparison
            # of the aligned keys places them without hashing the batch.
            ahead = min(len(self._keys), len(keys) - cursor)
            same = bool_mask(pc.equal(self._keys.slice(0, ahead), keys.slice(cursor, ahead)))
            placed = ahead if same.all() else int(np.argmin(same))
            if placed:
                flags[cursor:cursor + placed] |= self._flags[:placed]
                cursor += placed
            elif cursor and self._keys[0] == keys[cursor - 1]:  # the rest of a run cut by a texts batch edge
                flags[cursor - 1] |= self._flags[0]
                placed = 1
            else:  # rows without texts (or texts out of order): find the runs by key
                positions = pc.index_in(self._keys, keys).fill_null(-1).to_numpy()
                found = positions >= 0
                placed = len(found) if found.all() else int(np.argmin(found))  # the leading runs this batch has
                if found[placed:].any():  # a run this batch lacks, before runs it has: it can never be placed
                    raise _TextsOutOfOrder(f"the texts of key {self._keys[placed].as_py()!r} are not where the "
                                           "index's order puts them")
                np.logical_or.at(flags, positions[:placed], self._flags[:placed])  # a key's runs may repeat
                cursor = int(positions[:placed].max()) + 1 if placed else cursor
            self._keys, self._flags = self._keys.slice(placed), self._flags[placed:]
            if len(self._keys) and (placed == 0 or cursor >= len(keys)):
                return flags  # the next run belongs to a later index batch

    def check_all_placed(self) -> None:
        """After the last index batch: every run found its row (texts of a key missing from the index, or out
        of order, are left over)."""
        if len(self._keys) or next(self._runs, None) is not None:
            raise _TextsOutOfOrder("texts.parquet has texts after the index's last key, or of keys not in the index")


def _grouped_texts(table: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Texts rows by key, web first, then synthetic by descending score."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for row in table.to_pylist():
        grouped.setdefault(row["key"], []).append(row)
    for rows in grouped.values():
        rows.sort(key=lambda r: (r.get("source") != "web", -(r.get("itm_score") or 0.0)))
    return grouped


def _text_filter_columns(where: SampleFilter) -> list[str]:
    """The texts columns `where`'s conditions read."""
    scored = where.min_score is not None or where.max_score is not None
    used = {"key": True, "source": bool(where.source), "kept": bool(where.decision), "itm_score": scored,
            "text": bool(where.q)}
    return [column for column, wanted in used.items() if wanted]


@dataclass(frozen=True)
class Matches:
    """Which index rows match a filter: a bitmap (1 bit a row: 16 MB at 129M samples) per index batch."""

    bits: list[np.ndarray]  # np.packbits of each batch's row mask
    sizes: np.ndarray  # rows per batch
    counts: np.ndarray  # matching rows per batch

    @classmethod
    def of(cls, masks: Iterator[np.ndarray], progress: Progress | None = None) -> "Matches":
        bits, sizes, counts = [], [], []
        for mask in masks:
            if progress is not None:
                progress.advance(len(mask))  # (raises `Abandoned` once nobody waits for the answer)
            bits.append(np.packbits(mask))
            sizes.append(len(mask))
            counts.append(int(mask.sum()))
        return cls(bits, np.array(sizes, dtype=np.int64), np.array(counts, dtype=np.int64))

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def rows(self, offset: int, limit: int) -> np.ndarray:
        """Row numbers (in the file) of matches number offset .. offset+limit-1, ascending."""
        before = np.cumsum(self.counts) - self.counts  # matches in the batches before each batch
        first_row = np.cumsum(self.sizes) - self.sizes
        found: list[np.ndarray] = []
        wanted = limit
        for batch in range(int(np.searchsorted(before + self.counts, offset, side="right")), len(self.bits)):
            if wanted <= 0:
                break
            positions = np.flatnonzero(np.unpackbits(self.bits[batch], count=int(self.sizes[batch])))
            taken = positions[max(offset - int(before[batch]), 0):][:wanted]
            found.append(taken + first_row[batch])
            wanted -= len(taken)
        return np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
