"""A synthetic "noisy web" image-caption corpus with ground truth, served over real HTTP on 127.0.0.1.

Stands in for CC3M/LAION-style alt-text data (BLIP §3.1 trains on noisy web pairs) so every stage can be run and
*measured* on one machine: each image is a rendered scene of shapes (kind, colour, size, position, count,
background) whose true caption is known. A controlled fraction of the web texts is replaced by the noise real
alt-text has (a wrong description, a camera file name, boilerplate, unrelated text), and a few records are broken
the ways real URLs break (404, corrupt or empty bodies, HTML served as an image, an oversized image, a transient
503) or are odd but valid (CMYK, greyscale, PNG with alpha). `ground_truth.parquet` keeps every label, so later
stages can score caption quality and filter decisions against the truth.

Layout of a corpus directory:
    images/<row>.<ext>        what the server returns (missing file = 404)
    ground_truth.parquet      one row per record (see GROUND_TRUTH_COLUMNS)
    corpus.json               n, seed, noise fraction, counts by kind
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

from pipelines.config import check_range

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "purple": (140, 40, 170), "orange": (250, 140, 0), "black": (10, 10, 10), "white": (250, 250, 250),
}
BACKGROUNDS = {"white": (255, 255, 255), "grey": (128, 128, 128), "black": (0, 0, 0), "light blue": (170, 210, 250),
               "beige": (235, 220, 185)}
POSITIONS = ("left", "right", "top", "bottom", "center")
NUMBER_WORDS = {1: "a", 2: "two", 3: "three"}
NOISE_KINDS = ("wrong_description", "file_name", "boilerplate", "unrelated")
# What each bad kind should turn into downstream: the download error class, or "ok" (valid but odd images),
# or the shard-stage drop reason.
BAD_KINDS = {
    "http_404": "http_404",
    "corrupt_jpeg": "decode_error",
    "empty_body": "empty_body",
    "html_body": "decode_error",
    "oversized": "too_large",
    "transient_503": "http_503",  # fails once, then succeeds: what --retry-failed recovers
    "cmyk": "ok",
    "greyscale": "ok",
    "png_alpha": "ok",
    "duplicate_url": "duplicate_url",  # same URL as another record, other caption: dropped by the shard stage
    "duplicate_image": "duplicate_image",  # other URL, identical bytes: dropped by the shard stage
    "empty_caption": "empty_caption",
    "absurd_caption": "absurd_caption",
}
OPTED_OUT = "opted_out"  # a good image whose server says X-Robots-Tag: noai (DemoCorpusConfig.opt_out_fraction)
BOILERPLATE = ("Click here to enlarge", "Free shipping on all orders over $50!", "Stock Photo - Royalty Free Image",
               "Image may contain: text", "Copyright (c) All rights reserved.", "thumbnail", "Loading...")
UNRELATED = ("Best recipes for a summer barbecue 2019", "How to fix a leaking kitchen tap in 5 steps",
             "Quarterly earnings beat analyst expectations", "Wedding venue in the countryside, booking now open",
             "Vintage leather armchair for sale", "Top 10 hiking trails near the lake")
GROUND_TRUTH_COLUMNS = ("row", "path", "caption", "true_caption", "shape", "colour", "size", "position", "count",
                        "background", "is_noisy", "noise_kind", "bad_kind", "expected")


@dataclass(frozen=True, kw_only=True)
class DemoCorpusConfig:
    """How to generate the demo corpus."""

    n: int = 5000  # number of records (URLs) in the source list
    seed: int = 0  # everything (scenes, noise, bad records) follows from this seed
    noise_fraction: float = 0.4  # fraction of good records whose web text is replaced by noise
    bad_fraction: float = 0.06  # fraction of records broken in one of BAD_KINDS (at least one of each when n allows)
    image_size: int = 96  # rendered side in pixels
    oversized_side: int = 5000  # side of the "oversized" image (a flat PNG: tiny file, huge pixel count)
    jpeg_quality: int = 90
    # fraction of good records whose server answers `X-Robots-Tag: noai, noimageai` (an opt-out the download
    # honours: disallowed_by_robots); drawn apart from everything else, so 0 (the demo's) leaves the corpus as it was
    opt_out_fraction: float = 0.0
    ADDED_LATER = ("opt_out_fraction",)  # out of the hash at its default: the corpora made before are the same

    def __post_init__(self) -> None:
        check_range("DemoCorpusConfig", "n", self.n, 1)
        check_range("DemoCorpusConfig", "noise_fraction", self.noise_fraction, 0.0, 1.0)
        check_range("DemoCorpusConfig", "bad_fraction", self.bad_fraction, 0.0, 0.5)
        check_range("DemoCorpusConfig", "image_size", self.image_size, 16, 1024)
        check_range("DemoCorpusConfig", "oversized_side", self.oversized_side, 1024, 20000)
        check_range("DemoCorpusConfig", "jpeg_quality", self.jpeg_quality, 1, 100)
        check_range("DemoCorpusConfig", "opt_out_fraction", self.opt_out_fraction, 0.0, 0.5)


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    size: str  # "small" | "large"
    position: str
    count: int
    background: str
    jitter: tuple[float, float, float] = (0.0, 0.0, 1.0)  # dx, dy (fraction of the side), radius scale


# ---------------------------------------------------------------------------------------------- scenes


def random_scene(rng: random.Random) -> Scene:
    colour = rng.choice(list(COLOURS))
    background = rng.choice([b for b in BACKGROUNDS if b != colour])
    # The jitter keeps two scenes with the same labels from being byte-identical images (which would be
    # real exact duplicates, confusing the ground truth of the duplicate_image records).
    return Scene(rng.choice(SHAPES), colour, rng.choice(("small", "large")), rng.choice(POSITIONS),
                 rng.choice((1, 1, 2, 3)), background, _jitter(rng))


def _jitter(rng: random.Random) -> tuple[float, float, float]:
    return (rng.uniform(-0.06, 0.06), rng.uniform(-0.06, 0.06), rng.uniform(0.85, 1.15))


def _pixels_digest(image: Any, bad_kind: str | None) -> bytes:
    shown = image.convert("L") if bad_kind == "greyscale" else image
    return hashlib.sha256(shown.tobytes()).digest()


def true_caption(scene: Scene) -> str:
    """The canonical description (what a perfect captioner would say)."""
    noun = scene.shape + ("s" if scene.count > 1 else "")
    where = f" on the {scene.position}" if scene.count == 1 and scene.position != "center" else ""
    if scene.count == 1 and scene.position == "center":
        where = " in the center"
    return f"{NUMBER_WORDS[scene.count]} {scene.size} {scene.colour} {noun}{where} on a {scene.background} background"


def web_caption(scene: Scene, rng: random.Random) -> str:
    """A true description in one of several web-like phrasings (capitals, punctuation, extra words)."""
    noun = scene.shape + ("s" if scene.count > 1 else "")
    article = NUMBER_WORDS[scene.count].capitalize()
    templates = (
        true_caption(scene),
        f"{article} {scene.colour} {noun} against a {scene.background} backdrop.",
        f"Photo of {NUMBER_WORDS[scene.count]} {scene.size} {scene.colour} {noun}",
        f"{scene.colour.title()} {noun} ({scene.size}) on {scene.background}!",
        f"illustration: {NUMBER_WORDS[scene.count]} {scene.colour} {noun}, {scene.background} background",
        f"{article} {scene.size} {noun} in {scene.colour} - simple geometric art",
    )
    return rng.choice(templates)


def noise_text(kind: str, rng: random.Random) -> str:
    if kind == "wrong_description":
        return true_caption(random_scene(rng))  # fluent, but of another scene
    if kind == "file_name":
        return rng.choice((f"IMG_{rng.randint(1000, 9999)}.jpg", f"DSC{rng.randint(10000, 99999)}.JPG",
                           f"image ({rng.randint(1, 40)}).png", f"photo_{rng.randint(1, 999):03d}_final.jpeg"))
    if kind == "boilerplate":
        return rng.choice(BOILERPLATE)
    return rng.choice(UNRELATED)


def render(scene: Scene, size: int) -> Any:
    """Draw the scene into a PIL RGB image of `size` x `size`."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    dx, dy, scale = scene.jitter
    radius = size * (0.12 if scene.size == "small" else 0.22) * scale
    centres = [(cx + dx * size, cy + dy * size) for cx, cy in _centres(scene, size)]
    for cx, cy in centres:
        draw_shape(draw, scene.shape, cx, cy, radius / (1.4 if scene.count > 1 else 1.0), COLOURS[scene.colour])
    return image


def draw_shape(draw: Any, kind: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """One shape of the corpus vocabulary centred at (cx, cy) with radius r, in pixels. The downstream test sets
    (downstream_synth) draw their multi-shape scenes with it, so their images come from this generator too."""
    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif kind == "star":  # two opposed triangles
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.5), (cx + r, cy + r * 0.5)], fill=fill)
        draw.polygon([(cx, cy + r), (cx - r, cy - r * 0.5), (cx + r, cy - r * 0.5)], fill=fill)
    else:
        raise ValueError(f"cannot draw shape kind {kind!r} (known: {', '.join(SHAPES)})")


def _centres(scene: Scene, size: int) -> list[tuple[float, float]]:
    if scene.count > 1:
        step = size / (scene.count + 1)
        return [(step * (i + 1), size / 2) for i in range(scene.count)]
    offset = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72),
              "center": (0.5, 0.5)}[scene.position]
    return [(offset[0] * size, offset[1] * size)]


# ---------------------------------------------------------------------------------------------- writing


def _bad_assignment(cfg: DemoCorpusConfig, rng: random.Random) -> dict[int, str]:
    """Which rows are broken and how: one of each kind first (when n allows), then random kinds."""
    n_bad = round(cfg.n * cfg.bad_fraction)
    kinds = list(BAD_KINDS)
    chosen = kinds[:n_bad] if n_bad < len(kinds) else kinds + [rng.choice(kinds) for _ in range(n_bad - len(kinds))]
    # Only one oversized image: it is the slow one to decode.
    chosen = [k if k != "oversized" or i == chosen.index("oversized") else "http_404" for i, k in enumerate(chosen)]
    # Rows 0 and 1 stay good: duplicates point back at them.
    rows = rng.sample(range(2, cfg.n), min(len(chosen), max(cfg.n - 2, 0)))
    return dict(zip(rows, chosen))


def _opt_out(cfg: DemoCorpusConfig, rows: list[dict[str, Any]]) -> None:
    """Mark `opt_out_fraction` of the good records as opted out (their own random draw: the rest of the corpus is
    the same with or without them). Rows 0 and 1 stay: duplicates point at them."""
    good = [row for row in rows[2:] if row["bad_kind"] is None]
    for row in random.Random(f"{cfg.seed}-opt-out").sample(good, round(cfg.opt_out_fraction * len(good))):
        row.update(bad_kind=OPTED_OUT, expected="disallowed_by_robots")


def _encode(image: Any, fmt: str, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=quality) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_corpus(cfg: DemoCorpusConfig, out_dir: str | Path) -> dict[str, Any]:
    """Generate the corpus into `out_dir` (images/, ground_truth.parquet, corpus.json); returns the summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    out = Path(out_dir)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    bad = _bad_assignment(cfg, rng)
    rows: list[dict[str, Any]] = []
    first_jpeg: bytes | None = None
    seen_pixels: set[bytes] = set()
    for row in range(cfg.n):
        scene = random_scene(rng)
        bad_kind = bad.get(row)
        if bad_kind == "duplicate_image":
            scene = rows[0]["_scene"]
        elif bad_kind == "duplicate_url":
            scene = rows[1]["_scene"]
        is_noisy = bad_kind is None and rng.random() < cfg.noise_fraction
        noise_kind = rng.choice(NOISE_KINDS) if is_noisy else None
        caption = noise_text(noise_kind, rng) if noise_kind else web_caption(scene, rng)
        if bad_kind == "duplicate_url":
            caption = f"{caption} (mirror {row})"  # distinct text: exact (url, caption) duplicates are another matter
        ext, body = "jpg", None
        image = render(scene, cfg.image_size)
        if bad_kind not in ("duplicate_image", "duplicate_url"):
            # Same labels + jitter that rounds to the same pixels would be a real exact duplicate: redraw.
            while (digest := _pixels_digest(image, bad_kind)) in seen_pixels:
                scene = dataclasses.replace(scene, jitter=_jitter(rng))
                image = render(scene, cfg.image_size)
            seen_pixels.add(digest)
        if bad_kind in (None, "transient_503", "duplicate_url", "empty_caption", "absurd_caption"):
            body = _encode(image, "JPEG", cfg.jpeg_quality)
        elif bad_kind == "corrupt_jpeg":
            body = b"\xff\xd8\xff\xe0" + rng.randbytes(2048)
        elif bad_kind == "empty_body":
            body = b""
        elif bad_kind == "html_body":
            body = b"<!DOCTYPE html><html><head><title>Not here</title></head><body>moved</body></html>"
        elif bad_kind == "oversized":
            ext, body = "png", _encode(Image.new("RGB", (cfg.oversized_side,) * 2, (200, 10, 10)), "PNG", 0)
        elif bad_kind == "cmyk":
            body = _encode(image.convert("CMYK"), "JPEG", cfg.jpeg_quality)
        elif bad_kind == "greyscale":
            body = _encode(image.convert("L"), "JPEG", cfg.jpeg_quality)
        elif bad_kind == "png_alpha":
            rgba = image.convert("RGBA")
            rgba.putalpha(200)
            ext, body = "png", _encode(rgba, "PNG", 0)
        elif bad_kind == "duplicate_image":
            body = first_jpeg  # row 0's bytes under another URL
        if bad_kind == "empty_caption":
            caption = rng.choice(("", "...", " ! ", "#"))
        elif bad_kind == "absurd_caption":
            caption = rng.choice(("1234567 890 2211", "x" * 5 + " " + "lorem " * 400))
        path = f"images/{row:06d}.{ext}"
        if bad_kind == "duplicate_url":
            path = rows[1]["path"]  # the same URL as row 1, with its own caption
        elif body is not None and bad_kind != "http_404":
            (out / path).write_bytes(body)
        if row == 0:
            first_jpeg = body
        rows.append({
            "row": row, "path": path, "caption": caption, "true_caption": true_caption(scene),
            "shape": scene.shape, "colour": scene.colour, "size": scene.size, "position": scene.position,
            "count": scene.count, "background": scene.background, "is_noisy": is_noisy, "noise_kind": noise_kind,
            "bad_kind": bad_kind, "expected": BAD_KINDS.get(bad_kind or "", "ok"), "_scene": scene,
        })
    for record in rows:
        del record["_scene"]
    _opt_out(cfg, rows)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, out / "ground_truth.parquet")
    summary = {
        "n": cfg.n, "seed": cfg.seed, "noise_fraction": cfg.noise_fraction, "image_size": cfg.image_size,
        "noisy": sum(r["is_noisy"] for r in rows),
        "noise_kinds": dict(Counter(r["noise_kind"] for r in rows if r["noise_kind"])),
        "bad_kinds": dict(Counter(r["bad_kind"] for r in rows if r["bad_kind"])),
        "transient": [r["path"] for r in rows if r["bad_kind"] == "transient_503"],
        "opted_out": [r["path"] for r in rows if r["bad_kind"] == OPTED_OUT],
    }
    (out / "corpus.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def read_ground_truth(corpus_dir: str | Path) -> Any:
    """The ground-truth table (pyarrow) of a corpus directory."""
    import pyarrow.parquet as pq

    path = Path(corpus_dir) / "ground_truth.parquet"
    if not path.exists():
        raise FileNotFoundError(f"{path}: not a demo corpus (run `blip demo-corpus write {corpus_dir}`)")
    return pq.read_table(path)


def write_source_list(corpus_dir: str | Path, base_url: str, out_path: str | Path, sha256: bool = False) -> Path:
    """Write the img2dataset-form source list (parquet: url, caption, source_key) with URLs under `base_url`;
    with `sha256`, each image's sha256 as it is now (as DataComp's metadata lists them; the empty body's for a
    record without one), for the download's `verify_hash_col: sha256`.

    The server's port is ephemeral, so the URLs change from run to run; `source_key` (from the corpus path and
    caption) does not, so sample keys, the train/val split and every seeded order are the same in every run."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    truth = read_ground_truth(corpus_dir)
    paths, captions = truth.column("path").to_pylist(), truth.column("caption").to_pylist()
    urls = [f"{base_url.rstrip('/')}/{path}" for path in paths]
    keys = [hashlib.sha256(f"{path}\n{caption}".encode()).hexdigest()[:16] for path, caption in zip(paths, captions)]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = {"url": urls, "caption": captions, "source_key": keys}
    if sha256:
        files = [Path(corpus_dir) / path for path in paths]
        columns["sha256"] = [hashlib.sha256(file.read_bytes() if file.is_file() else b"").hexdigest() for file in files]
    pq.write_table(pa.table(columns), out)
    return out


# ---------------------------------------------------------------------------------------------- serving


def _handler(corpus_dir: Path, transient: set[str], delay: float,
             opted_out: frozenset[str] = frozenset()) -> type[SimpleHTTPRequestHandler]:  # fmt: skip
    seen: set[str] = set()
    lock = threading.Lock()

    class CorpusHandler(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(corpus_dir), **kwargs)

        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            path = self.path.lstrip("/").split("?", 1)[0]
            if delay:
                time.sleep(delay)  # web latency: makes a download slow enough to interrupt in tests
            with lock:
                first = path in transient and path not in seen
                seen.add(path)
            if first:  # a transient failure: the first request of this path gets a 503
                self.send_error(503, "Service Unavailable (transient)")
                return
            super().do_GET()

        def end_headers(self) -> None:
            if self.path.lstrip("/").split("?", 1)[0] in opted_out:  # the site's opt-out, on a good image
                self.send_header("X-Robots-Tag", "noai, noimageai")
            super().end_headers()

        def guess_type(self, path: Any) -> str:
            # Everything under images/ is served as an image, as a misconfigured web server would (HTML too).
            return "image/png" if str(path).endswith(".png") else "image/jpeg"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet server
            pass

    return CorpusHandler


@contextlib.contextmanager
def serve_corpus(corpus_dir: str | Path, port: int = 0, delay: float = 0.0) -> Iterator[str]:
    """Serve a corpus directory on 127.0.0.1 (ephemeral port by default); yields the base URL.

    `delay` seconds are added to every request (simulated latency).
    """
    corpus = Path(corpus_dir).resolve()
    summary = json.loads((corpus / "corpus.json").read_text()) if (corpus / "corpus.json").exists() else {}
    handler = _handler(corpus, set(summary.get("transient", ())), delay, frozenset(summary.get("opted_out", ())))
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="demo-corpus-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def match_ground_truth(corpus_dir: str | Path, urls: list[str], raw_captions: list[str]) -> list[dict[str, Any] | None]:
    """The ground-truth row of each (url, raw web caption), whatever host/port served it (None if unknown).

    Keys of downloaded samples hash the full URL, which holds the server's ephemeral port, so later stages
    join on (path, caption) instead: e.g. with index.parquet's `url` and `raw_caption` columns.
    """
    truth = {(row["path"], row["caption"]): row for row in read_ground_truth(corpus_dir).to_pylist()}
    matched = []
    for url, caption in zip(urls, raw_captions):
        path = url.split("://", 1)[-1].split("/", 1)[-1] if url else ""
        matched.append(truth.get((path, caption)))
    return matched
