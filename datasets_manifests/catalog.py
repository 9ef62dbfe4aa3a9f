"""Catalog of the public sources BLIP pretrains and finetunes on, and the 14M / 129M compositions.

The facts live in data files (`datasets_manifests/catalog/*.yaml`), each taken from
shared/docs/blip_spec.md and tagged with its evidence (C code, R readme/card, P paper, I issue,
U unverified). They load into frozen dataclasses through a small strict loader: an unknown or
misspelled key is an error naming the file and the key (the project's config rule; `pipelines.config`
is not imported because datasets_manifests must not depend on pipelines).
"""

from __future__ import annotations

import dataclasses
import functools
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"
Evidence = Literal["C", "R", "P", "I", "U"]
EVIDENCE_MEANING = {
    "C": "verified in code/config", "R": "README / model or dataset card", "P": "paper excerpt",
    "I": "GitHub issue", "U": "unverified",
}


class CatalogError(ValueError):
    """A catalog file that does not match the schema, or an unknown source/composition name."""


@dataclass(frozen=True, kw_only=True)
class Count:
    """An expected count and how sure we are of it."""

    what: str  # "train images", "images", ...
    value: int
    approx: bool = False  # "~113K" rather than an exact number
    evidence: Evidence = "U"

    def describe(self) -> str:
        number = f"~{self.value:,}" if self.approx else f"{self.value:,}"
        return f"{self.what}: {number} [{self.evidence}{'' if self.evidence != 'U' else ': unverified'}]"


@dataclass(frozen=True, kw_only=True)
class Annotation:
    """One annotation file (JSON) of a source; `url` is None where the spec does not record one."""

    file: str
    url: str | None = None
    split: str | None = None  # train / val / test
    flavour: str | None = None  # web_filtered / synthetic_filtered / synthetic_filtered_large
    note: str = ""
    evidence: Evidence = "U"


@dataclass(frozen=True, kw_only=True)
class Source:
    name: str
    title: str
    category: Literal["human", "web", "bootstrapped"]
    description: str
    images: str  # where the images come from
    annotation_format: str
    annotations: tuple[Annotation, ...] = ()
    counts: tuple[Count, ...] = ()
    derived_from: tuple[str, ...] = ()  # for bootstrapped releases: the web sources they cover
    lavis_builders: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Composition:
    """A pretraining mix of sources (BLIP's 14M and 129M sets)."""

    name: str
    title: str
    description: str
    sources: tuple[str, ...]
    bootstrapped_from: tuple[str, ...] = ()  # the released CapFilt caption files that replace the web captions
    annotations: tuple[Annotation, ...] = ()
    counts: tuple[Count, ...] = ()
    notes: tuple[str, ...] = ()


# --------------------------------------------------------------------------- strict loading
def _build(cls: type, raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected a mapping for {cls.__name__}, got {type(raw).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CatalogError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(fields)})")
    values = {}
    for name, spec in fields.items():
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], f"{where}.{name}")
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise CatalogError(f"{where}: missing required key {name!r}")
    return cls(**values)


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [option for option in options if option is not type(None)]
        return _coerce(inner, value, where)
    if origin is Literal:
        if value not in get_args(hint):
            raise CatalogError(f"{where}: {value!r} is not one of {', '.join(map(str, get_args(hint)))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise CatalogError(f"{where}: expected a list, got {type(value).__name__}")
        (inner, _ellipsis) = get_args(hint)
        return tuple(_coerce(inner, item, f"{where}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise CatalogError(f"{where}: expected an integer, got {value!r}")
    if hint in (str, bool) and not isinstance(value, hint):
        raise CatalogError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def load_entry(path: Path) -> Source | Composition:
    """One catalog file: `type: source` or `type: composition` plus the fields of that dataclass."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CatalogError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(raw, dict) or raw.get("type") not in ("source", "composition"):
        raise CatalogError(f"{path}: expected a mapping with 'type: source' or 'type: composition'")
    raw = dict(raw)
    cls = Source if raw.pop("type") == "source" else Composition
    entry = _build(cls, raw, path.name)
    if entry.name != path.stem:
        raise CatalogError(f"{path}: name {entry.name!r} must match the file name {path.stem!r}")
    return entry


@functools.cache
def _load_all(directory: Path = CATALOG_DIR) -> tuple[dict[str, Source], dict[str, Composition]]:
    sources: dict[str, Source] = {}
    compositions: dict[str, Composition] = {}
    for path in sorted(directory.glob("*.yaml")):
        entry = load_entry(path)
        (sources if isinstance(entry, Source) else compositions)[entry.name] = entry
    for entry in [*sources.values(), *compositions.values()]:
        linked = entry.derived_from if isinstance(entry, Source) else (*entry.sources, *entry.bootstrapped_from)
        for name in linked:
            if name not in sources:
                raise CatalogError(f"{entry.name}: refers to unknown source {name!r}")
    return sources, compositions


def list_sources() -> list[Source]:
    return list(_load_all()[0].values())


def list_compositions() -> list[Composition]:
    return list(_load_all()[1].values())


def get_source(name: str) -> Source:
    sources = _load_all()[0]
    if name not in sources:
        raise CatalogError(f"unknown source {name!r} (known: {', '.join(sources)})")
    return sources[name]


def composition(name: str) -> Composition:
    compositions = _load_all()[1]
    if name not in compositions:
        raise CatalogError(f"unknown composition {name!r} (known: {', '.join(compositions)})")
    return compositions[name]


def describe(entry: Source | Composition) -> list[str]:
    """Human-readable lines for `blip data catalog NAME`."""
    kind = "composition" if isinstance(entry, Composition) else f"source ({entry.category})"
    lines = [f"{entry.name}: {entry.title}  [{kind}]", f"  {entry.description}"]
    if isinstance(entry, Source):
        lines += [f"  images: {entry.images}", f"  format: {entry.annotation_format}"]
        if entry.derived_from:
            lines.append(f"  covers: {', '.join(entry.derived_from)}")
        if entry.lavis_builders:
            lines.append(f"  LAVIS builders: {', '.join(entry.lavis_builders)}")
    else:
        lines.append(f"  sources: {', '.join(entry.sources)}")
        if entry.bootstrapped_from:
            lines.append(f"  bootstrapped captions: {', '.join(entry.bootstrapped_from)}")
    if entry.counts:
        lines.append("  expected counts:")
        lines += [f"    {count.describe()}" for count in entry.counts]
    if entry.annotations:
        lines.append("  annotations:")
        for item in entry.annotations:
            tag = item.split or item.flavour or ""
            lines.append(f"    {item.file}{f' ({tag})' if tag else ''}: {item.url or '(no URL in spec)'}")
    lines += [f"  note: {note}" for note in entry.notes]
    return lines
