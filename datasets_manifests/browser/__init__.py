"""The manifest browser: a read-only web app over a registry (`blip data serve`); see app.py."""

from __future__ import annotations

import shlex
from typing import Any

DEFAULT_PORT = 8765  # `blip data serve`'s port, and the one the printed URLs name


def version_url(manifest: Any, base: str = f"http://127.0.0.1:{DEFAULT_PORT}") -> str:
    """Browser address of a version, as printed by stages and `blip data show`.

    The URL names no registry: one server browses one registry, so the address is only useful next to the
    `blip data serve --registry ...` command that starts it (see `browse_line`).
    """
    from urllib.parse import quote

    return f"{base}/#/v/{manifest.kind}/{quote(manifest.name)}/{quote(manifest.version)}"


def browse_line(manifest: Any, registry_url: str) -> str:
    """`browse: blip data serve --registry R  ->  URL`: the command to start the browser, then where to look."""
    return f"browse: blip data serve --registry {shlex.quote(registry_url)}  ->  {version_url(manifest)}"
