"""Atomic file writing: a temp file in the same folder and os.replace, so no reader sees half a file."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], write: Any) -> Path:
    """Write a file via a temp file in the same folder + os.replace, so readers never see half a file.

    ``write`` is called with the open text stream. If it raises, the temp file is removed and an
    existing file at ``path`` is left byte-for-byte unchanged.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def _mode_for(target: Path) -> int:
    """Keep an existing file's permissions; a new file gets 0o666 less the umask (mkstemp gives 0o600)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike[str], doc: Any, *, sort_keys: bool = False) -> Path:
    """Write ``doc`` as indented JSON with a trailing newline, atomically (see ``write_text_atomic``)."""

    def write(stream: Any) -> None:
        json.dump(doc, stream, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
        stream.write("\n")

    return write_text_atomic(path, write)
