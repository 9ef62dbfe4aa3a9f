"""The manifest browser: a read-only web app over a registry (`blip data serve`); see app.py."""

from __future__ import annotations

from typing import Any


def version_url(manifest: Any, registry_url: str | None = None, base: str = "http://127.0.0.1:8765") -> str:
    """Browser address of a version, as printed by stages and `blip data show`.

    `base` is where `blip data serve --registry REGISTRY_URL` listens (its default port is 8765).
    """
    from urllib.parse import quote

    return f"{base}/#/v/{manifest.kind}/{quote(manifest.name)}/{quote(manifest.version)}"
