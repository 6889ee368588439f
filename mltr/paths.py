"""Local paths from ``file://`` URIs, for every part that takes a path or a URI (no torch here)."""

from __future__ import annotations

import urllib.parse
import urllib.request

from mltr.errors import ConfigError


def local_path(uri: str) -> str:
    """The path a ``file://`` URI names (``file:///data/my%20set`` is ``/data/my set``; the host
    may be empty or ``localhost``); any other string as it is."""
    if not uri.startswith("file://"):
        return uri
    parts = urllib.parse.urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(
            f"{uri!r}: a file:// URI names a path on this machine (file:///absolute/path), "
            f"not one on host {parts.netloc!r}"
        )
    return urllib.request.url2pathname(parts.path)
