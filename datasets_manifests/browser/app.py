"""The manifest browser: a read-only web app (Starlette + uvicorn) over a registry of versions.

Pages (one static page, plain JS, hash-routed) show every dataset, model and evaluation version; a version's
counts, stats, drop reasons, score histograms, lineage (up to the sources, down to the models trained on it),
files and checksums; a sample grid (thumbnail, web text, synthetic captions, ITM scores, keep/drop and why)
with filters; a diff between two versions; model versions with their evaluation metrics side by side; what the
stage runs left in their work dirs (shown, not removed: `blip data work --remove` does that).
Each page is backed by a JSON endpoint:

    GET /api/versions                                   all versions (summary rows)
    GET /api/versions/{kind}/{name}/{version}           one version: manifest, files, parquet footers, source
                                                        columns, relatives
    GET /api/versions/{kind}/{name}/{version}/lineage   graph: nodes (level < 0 ancestors, > 0 descendants), edges
    GET /api/versions/{kind}/{name}/{version}/histograms  ITM score / size / caption-length histograms
    GET /api/versions/{kind}/{name}/{version}/samples   ?q=&source=&min_score=&max_score=&decision=&split=
                                                        &column=&column_min=&column_max=&limit=&offset=
    GET /api/versions/{kind}/{name}/{version}/thumb/{key}?size=   JPEG thumbnail cut from the shard
    GET /api/versions/{kind}/{name}/{version}/image?path=         thumbnail of an image file the manifest lists
    GET /api/diff?a=name@v1&b=name@v2&category=&limit=&offset=    added / removed / recaptioned keys
    GET /api/models                                     model versions with training + evaluation metrics
    GET /api/work                                       what stage runs left in work dirs (`blip data work`)

A filter, histogram or diff that takes longer than a second (a 129M-sample version) answers 202
{pending, what, done, total, message} while it goes on in a background thread; the page asks again until the
answer is there (`jobs.py`); `blip data serve --wait-s N` makes requests wait up to N seconds instead.

Only files that a manifest references are ever read; the app never writes to the registry. It binds 127.0.0.1
unless told otherwise. The bootstrapping loop it displays is BLIP's CapFilt (Li et al. 2022, section 3.3).
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from datasets_manifests.browser import DEFAULT_PORT
from datasets_manifests.browser.jobs import WAIT_S, BackgroundAnswers, Pending
from datasets_manifests.browser.query import QueryError, SampleFilter
from datasets_manifests.browser.thumbnails import (
    DEFAULT_THUMB_SIZE, THUMB_SIZES, ThumbnailCache, ThumbnailError, make_thumbnail, read_referenced_image,
    read_sample_image,
)
from datasets_manifests.browser.views import (
    CATALOG_TTL_S, Catalog, diff_page, image_source, lineage_graph, metrics_of, model_table, side_rows, summary_row,
)
from datasets_manifests.manifest import Manifest
from datasets_manifests.ops import DIFF_CATEGORIES
from datasets_manifests.registry import (DataRemovedError, NotFoundError, OutsideRegistryError, Registry,
                                         RegistryError)
from datasets_manifests.tags import tags_by_id, tags_of_version

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).resolve().parent / "static"
# The only static files served: a fixed map, so no request path ever reaches the filesystem.
STATIC_FILES = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
MAX_PAGE = 200


def api(handler: Callable[[Request], Response]) -> Callable[[Request], Response]:
    """Turn every known failure into a JSON error with a clear message; the server never crashes on data."""

    @functools.wraps(handler)
    def wrapped(request: Request) -> Response:
        try:
            return handler(request)
        except Pending as pending:  # a long filter or diff, still running: the page polls (see jobs.py)
            return JSONResponse(pending.body(), status_code=pending.status)
        except (QueryError, ThumbnailError) as error:
            return _error(str(error), error.status)
        except DataRemovedError as error:  # `blip data rm --data-only`: gone on purpose, the record stays
            return _error(str(error), 410)
        except NotFoundError as error:
            return _error(str(error), 404)
        except OutsideRegistryError as error:
            return _error(str(error), 403)
        except RegistryError as error:
            return _error(str(error), 400)
        except pa.ArrowException as error:  # unreadable or corrupt Parquet file
            return _error(f"cannot read the per-sample index: {error}", 502)
        except Exception as error:  # noqa: BLE001 - corrupt files, unreadable parquet: show, don't crash
            log.exception("browser request %s failed", request.url.path)
            return _error(f"{type(error).__name__}: {error}", 500)

    return wrapped


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


THUMB_CACHE_CONTROL = "private, max-age=300"


def create_app(registry_url: str, *, thumb_cache_dir: str | Path | None = None, wait_s: float = WAIT_S) -> Starlette:
    """The browser app over one registry (any fsspec URL the `Registry` accepts).

    Read-only: a local registry directory that does not exist is an error (`NotFoundError`), never created.
    Filters, histograms and diffs taking longer than `wait_s` answer 202 with their progress (`jobs.Pending`)
    while they go on in the background; the page asks again until the answer is there.
    """
    registry = Registry(registry_url, create=False)
    catalog = Catalog(registry, ttl_s=CATALOG_TTL_S)
    thumbs = ThumbnailCache(thumb_cache_dir)

    def version_of(request: Request) -> Manifest:
        params = request.path_params
        return catalog.get(params["kind"], params["name"], params["version"])

    def page(_: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    def static(request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC_FILES:
            return _error(f"no static file {name!r}", 404)
        return FileResponse(STATIC_DIR / name, media_type=STATIC_FILES[name])

    @api
    def versions(_: Request) -> Response:
        removed = registry.removed_versions()  # one listing: versions whose data files `blip data rm` removed
        tags = tags_by_id(registry)  # `blip data tag`: read at each request, since tags move
        rows = [{**summary_row(m), "data_removed": (m.kind, m.name, m.version) in removed, "tags": tags.get(m.id, [])}
                for m in catalog.all()]  # fmt: skip
        return JSONResponse({"registry": registry.url, "versions": rows})

    @api
    def version(request: Request) -> Response:
        manifest = version_of(request)
        by_id, children = catalog.by_id(), catalog.children_map()
        parents = []
        for ref, parent_id in zip(manifest.parents, manifest.parent_ids):
            parent = by_id.get(parent_id)
            parents.append({"ref": ref, "id": parent_id, "kind": parent.kind if parent else None, "found": bool(parent)})
        kids = children.get(manifest.id, [])
        evaluations = [
            {"ref": m.ref, "kind": m.kind, "name": m.name, "version": m.version, "metrics": metrics_of(m),
             "task": m.metadata.get("task", "")}
            for m in kids if m.kind == "evaluation"
        ]
        body = {
            "manifest": {**manifest.to_dict(), "id": manifest.id, "ref": manifest.ref},
            "summary": summary_row(manifest),
            "parquet": catalog.data(manifest).summary() if manifest.kind == "dataset" else None,
            "source_columns": catalog.data(manifest).source_columns() if manifest.kind == "dataset" else [],
            "parents": parents,
            "children": [{"ref": m.ref, "kind": m.kind, "name": m.name, "version": m.version} for m in kids],
            "evaluations": evaluations,
            "data_removed": registry.removal(manifest),  # `blip data rm --data-only`: shards gone, index kept
            "tags": tags_of_version(registry, manifest),  # `blip data tag`: read at each request, since tags move
        }
        return JSONResponse(body)

    @api
    def lineage(request: Request) -> Response:
        return JSONResponse(lineage_graph(catalog, version_of(request)))

    @api
    def histograms(request: Request) -> Response:
        manifest = version_of(request)
        return JSONResponse(catalog.data(manifest).histograms(wait_s))

    @api
    def samples(request: Request) -> Response:
        manifest = version_of(request)
        where, limit, offset = parse_sample_query(request)
        rows, total = catalog.data(manifest).query_samples(where, limit, offset, wait_s)
        base = f"/api/versions/{manifest.kind}/{manifest.name}/{manifest.version}/thumb/"
        for row in rows:
            catalog.locations.get_or_make((manifest.id, row["key"]), lambda row=row: _location(row))
            row["thumb"] = base + row["key"]
        return JSONResponse({"ref": manifest.ref, "total": total, "offset": offset, "limit": limit,
                             "has_texts": catalog.data(manifest).has_texts, "samples": rows})

    @api
    def thumb(request: Request) -> Response:
        manifest = version_of(request)
        key = request.path_params["key"]
        size = _thumb_size(request)
        cache_key = ThumbnailCache.key(manifest.id, key, size)
        try:  # where the image is, first: a cached thumbnail of an image taken out or freed is not served
            source, location = image_source(catalog, manifest, key)
            data = None if catalog.data_removed(source) else thumbs.get(cache_key)
            if data is None:
                image = read_sample_image(registry, source, location, key)
                data = make_thumbnail(image, size, f"{manifest.ref} sample {key}")
                thumbs.put(cache_key, data)
        except (QueryError, ThumbnailError, DataRemovedError) as error:
            if getattr(error, "status", 410) == 410:
                thumbs.drop(cache_key)  # nor kept on this machine's disk
            raise
        # Kept by the web browser 5 minutes, not for a day as immutable: a takedown makes a version's image unshowable.
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": THUMB_CACHE_CONTROL})

    @api
    def image(request: Request) -> Response:
        manifest = version_of(request)
        relpath = request.query_params.get("path", "")
        size = _thumb_size(request)
        image_bytes = read_referenced_image(registry, manifest, relpath)
        cache_key = ThumbnailCache.key(manifest.id, "file", relpath, size)
        data = thumbs.get(cache_key)
        if data is None:
            data = make_thumbnail(image_bytes, size, f"{manifest.ref}/{relpath}")
            thumbs.put(cache_key, data)
        return Response(data, media_type="image/jpeg")

    # (id a, id b) -> DiffTables: memory-mapped files (unlinked; their disk is freed when the entry is evicted)
    diffs: BackgroundAnswers = BackgroundAnswers(8)

    @api
    def diff(request: Request) -> Response:
        from datasets_manifests.ops import diff_tables, manifest_changes

        refs = [request.query_params.get(side, "").strip() for side in ("a", "b")]
        if not all(refs):
            raise QueryError("diff needs two dataset versions: ?a=name@v1&b=name@v2")
        a, b = (registry.resolve(ref, kind="dataset") for ref in refs)
        category = request.query_params.get("category", "")
        if category and category not in DIFF_CATEGORIES:
            raise QueryError(f"category must be one of {', '.join(DIFF_CATEGORIES)}, not {category!r}")
        limit, offset = _int_param(request, "limit", 48, 1, MAX_PAGE), _int_param(request, "offset", 0, 0, None)
        for side in (a, b):  # a version without an index has no samples to diff: one clear message
            if not catalog.data(side).has_index:
                raise QueryError(f"{side.ref} has no per-sample index (index.parquet): nothing to diff", 404)
        rows = [catalog.data(side).metadata(catalog.data(side).index_path).num_rows for side in (a, b)]
        tables = diffs.get((a.id, b.id), lambda progress: diff_tables(registry, a, b, on_rows=progress.advance),
                           what=f"diff of {a.ref} and {b.ref}", total=rows[0] + 2 * rows[1], wait_s=wait_s)
        page_rows = diff_page(tables, category, offset, limit)
        sides = {}
        for label, side in (("a", a), ("b", b)):  # each side's rows read by their row numbers in its index
            numbers = [row.pop(f"row_{label}") for row in page_rows if row.get(f"row_{label}") is not None]
            sides[label] = side_rows(catalog.data(side), numbers)
            for key, found in sides[label].items():
                catalog.locations.get_or_make((side.id, key), lambda found=found: _location(found))
        for row in page_rows:
            row.pop("row_a", None)  # an added key has no row in a (its null stayed)
            row.pop("row_b", None)
            row["a"], row["b"] = sides["a"].get(row["key"]), sides["b"].get(row["key"])
            side = b if row["b"] is not None else a  # the thumbnail comes from the side that has the sample
            row["thumb"] = f"/api/versions/dataset/{side.name}/{side.version}/thumb/{row['key']}"
        counts = {name: tables.counts[name] for name in DIFF_CATEGORIES}
        total = counts[category] if category else sum(counts.values())
        return JSONResponse({"a": summary_row(a), "b": summary_row(b), "counts": counts, "all_counts": tables.counts,
                             "manifest_changes": manifest_changes(a, b), "category": category,
                             "total": total, "offset": offset, "limit": limit, "rows": page_rows})

    @api
    def models(_: Request) -> Response:
        return JSONResponse(model_table(catalog))

    @api
    def work(_: Request) -> Response:
        from datasets_manifests.ops import work_entries

        entries = [entry.to_dict() for entry in work_entries(registry)]
        return JSONResponse({"registry": registry.url, "entries": entries,
                             "bytes": sum(e["bytes"] for e in entries),
                             "spare_bytes": sum(e["bytes"] for e in entries if e["removable_as_leftover"])})  # fmt: skip

    def favicon(_: Request) -> Response:
        return Response(status_code=204)

    routes = [
        Route("/", page),
        Route("/favicon.ico", favicon),
        Route("/static/{name}", static),
        Route("/api/versions", versions),
        Route("/api/versions/{kind}/{name}/{version}", version),
        Route("/api/versions/{kind}/{name}/{version}/lineage", lineage),
        Route("/api/versions/{kind}/{name}/{version}/histograms", histograms),
        Route("/api/versions/{kind}/{name}/{version}/samples", samples),
        Route("/api/versions/{kind}/{name}/{version}/thumb/{key}", thumb),
        Route("/api/versions/{kind}/{name}/{version}/image", image),
        Route("/api/diff", diff),
        Route("/api/models", models),
        Route("/api/work", work),
    ]

    async def not_found(request: Request, error: Exception) -> Response:
        status = getattr(error, "status_code", 404)
        return _error(f"{request.method} {request.url.path}: {getattr(error, 'detail', 'not found')}", status)

    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found})
    app.state.registry, app.state.catalog, app.state.thumbs = registry, catalog, thumbs
    return app


def _location(row: dict[str, Any]) -> dict[str, Any]:
    return {"shard": row.get("shard"), "jpg_offset": row.get("jpg_offset"), "jpg_bytes": row.get("jpg_bytes"),
            "drop_reason": row.get("drop_reason")}


def _int_param(request: Request, name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query_params.get(name, "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise QueryError(f"{name} must be an integer, not {raw!r}") from None
    if value < low or (high is not None and value > high):
        raise QueryError(f"{name} must be in [{low}, {high if high is not None else 'inf'}], not {value}")
    return value


def _float_param(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name, "").strip()
    if raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise QueryError(f"{name} must be a number, not {raw!r}") from None


def _thumb_size(request: Request) -> int:
    size = _int_param(request, "size", DEFAULT_THUMB_SIZE, 1, max(THUMB_SIZES))
    if size not in THUMB_SIZES:  # a few fixed sizes keep the cache small
        raise QueryError(f"size must be one of {', '.join(map(str, THUMB_SIZES))}, not {size}")
    return size


def parse_sample_query(request: Request) -> tuple[SampleFilter, int, int]:
    params = request.query_params
    where = SampleFilter(
        q=params.get("q", "").strip(), source=params.get("source", "").strip(),
        min_score=_float_param(request, "min_score"), max_score=_float_param(request, "max_score"),
        decision=params.get("decision", "").strip(), split=params.get("split", "").strip(),
        column=params.get("column", "").strip(), column_min=_float_param(request, "column_min"),
        column_max=_float_param(request, "column_max"),
    )
    return where, _int_param(request, "limit", 48, 1, MAX_PAGE), _int_param(request, "offset", 0, 0, None)


def serve(registry_url: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, wait_s: float = WAIT_S) -> None:
    """Serve the browser until interrupted (blocks). Binds loopback unless `host` says otherwise; `wait_s` as in
    `create_app`."""
    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: the manifest browser is listening on {host}; anyone who can reach it can read the "
              "registry's samples", file=sys.stderr)
    app = create_app(registry_url, wait_s=wait_s)  # fails early, in one line, on a bad URL or a missing directory
    uvicorn.run(app, host=host, port=port, log_level="info")

