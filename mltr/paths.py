"""Local paths from ``file://`` URIs, for every part that takes a path or a URI (no torch here)."""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from pathlib import Path

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


def fsync(path: str | os.PathLike) -> None:
    """Flush a local file's or folder's contents (a folder: the names in it) to its disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(tmp: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the complete file ``tmp`` over ``target`` so that a crash or power loss leaves the
    old file or the whole new one: ``tmp``'s contents reach the disk before the rename, and the
    rename before this returns (the folder is synced too)."""
    fsync(tmp)
    os.replace(tmp, target)
    fsync(os.path.dirname(os.path.abspath(target)))


def file_under_a_file(path: str | os.PathLike) -> str | None:
    """The nearest existing folder-to-be above ``path`` that is a file (``a.jpg`` of ``a.jpg/x``), if any."""
    for parent in Path(os.path.abspath(path)).parents:
        if os.path.lexists(parent):
            return None if parent.is_dir() else str(parent)
    return None


def check_out_file(
    path: str | os.PathLike, flag: str = "--out", remote: str = "a local file is written here"
) -> Path:
    """``path`` as a local file a job may write: not a folder, nor below a file; a ``file://`` URI
    is taken as its path, any other URI is refused (``remote`` says where to write instead). The
    errors name ``flag``."""
    text = os.fspath(path)
    if "://" in text and not text.startswith("file://"):
        raise ConfigError(f"{flag} {text}: {remote}")
    text = local_path(text)
    if text.endswith(("/", os.sep)) or Path(text).is_dir():
        raise ConfigError(f"{flag} {text} is a folder: name the file to write")
    blocked = file_under_a_file(text)
    if blocked is not None:
        raise ConfigError(f"{flag} {text}: {blocked} is a file, not a folder")
    return Path(text)
