"""`blip data tag`: movable names of versions — `blip-129m-capfilt@prod`, `captioner@approved`.

Versions are immutable and numbered; a lab also needs a name that says which version a team uses now, that a command
line or a script can name (`blip capfilt … --captioner blip-captioner@prod`) and that moves when a better version is
approved without every script changing. A tag is that name: a small record in
`<root>/.tags/<kind>s/<name>/<tag>.json` naming the version by its content id, with the versions it named before
(who moved it, when), written whole or not at all. Every reference resolves through it (`Registry.resolve`:
`name@tag`). Tags are the only mutable records of a registry: what a stage made records its inputs by id, so moving
a tag never changes a lineage or a cache key. A tag cannot look like a version (`v3`), `latest` or a content-id
prefix (hex), so the three never meet; a version with a tag is not removed whole (`blip data rm` names the tag to
move or remove first).
"""

from __future__ import annotations

import getpass
import json
import re
import socket
from typing import Any

from datasets_manifests.manifest import KINDS, Manifest
from datasets_manifests.registry import (TAGS_DIR, Registry, RegistryError, check_name, now_utc, parse_ref,
                                         reads_as_version_or_id)

TAG_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
HISTORY = 50  # earlier versions a tag record keeps (newest first)


def check_tag(tag: str) -> str:
    """A tag name, or a RegistryError saying why it cannot be one."""
    if not TAG_RE.match(tag):
        raise RegistryError(f"invalid tag {tag!r}: start with a lowercase letter; then letters, digits, '.', '_', '-'")
    if reads_as_version_or_id(tag):
        raise RegistryError(f"invalid tag {tag!r}: it would read as 'latest', a version (v3) or a content-id prefix")
    return tag


def set_tag(registry: Registry, ref: str, tag: str) -> tuple[Manifest, dict[str, Any] | None]:
    """Point `tag` of `ref`'s name at `ref`'s version; returns that version and the tag's record before (None
    when the tag is new). Setting a tag to the version it names already changes nothing."""
    manifest = registry.resolve(ref)
    check_tag(tag)
    if any(m.version == tag for m in registry.versions(manifest.kind, manifest.name)):
        raise RegistryError(f"{manifest.name}@{tag} is a version's own name: a tag of that name would never be read")
    before = registry.tag_record(manifest.kind, manifest.name, tag)
    if before is not None and before.get("id") == manifest.id:
        return manifest, before
    history = [] if before is None else [{key: before.get(key) for key in ("version", "id", "tagged_at", "by")},
                                         *before.get("history", [])][:HISTORY]  # fmt: skip
    record = {"tag": tag, "kind": manifest.kind, "name": manifest.name, "version": manifest.version,
              "id": manifest.id, "tagged_at": now_utc(), "by": _who(), "history": history}  # fmt: skip
    registry.write_record(registry.tag_path(manifest.kind, manifest.name, tag), record)
    return manifest, before


def remove_tag(registry: Registry, ref: str) -> dict[str, Any]:
    """Remove the tag `name@tag`; returns its record (the version it named)."""
    name, tag = parse_ref(ref)
    check_name(name)
    if "@" not in ref:
        raise RegistryError(f"{ref!r}: name the tag as NAME@TAG")
    check_tag(tag)
    for kind in KINDS:
        record = registry.tag_record(kind, name, tag)
        if record is not None:
            registry.fs.rm_file(registry.tag_path(kind, name, tag))
            return record
    raise RegistryError(f"{name!r} has no tag {tag!r}")


def tags_of_version(registry: Registry, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """tag -> record of the tags that name `manifest` now."""
    return {tag: record for tag, record in registry.tags_of(manifest.kind, manifest.name).items()
            if record.get("id") == manifest.id}  # fmt: skip


def tags_by_id(registry: Registry) -> dict[str, list[str]]:
    """Manifest id -> its tags, from one listing of the registry's tags."""
    base = f"{registry.root}/{TAGS_DIR}"
    try:
        paths = registry.fs.find(base)
    except FileNotFoundError:
        return {}
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in paths if p.endswith(".json")):
        try:
            record = json.loads(registry.fs.cat_file(path))
        except FileNotFoundError:  # moved away between the listing and the read
            continue
        found.setdefault(record["id"], []).append(record["tag"])
    return found


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        user = "?"
    return f"{user}@{socket.gethostname()}"
