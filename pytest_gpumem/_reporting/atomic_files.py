"""Files a user gave us: read only when regular and bounded, written atomically, saved under a lock.

Writers go through a temp file in the target's folder and ``os.replace``, so a reader never sees half a
file; a temp file left by a killed writer carries its process id and is removed by the next save.
Readers refuse directories, FIFOs and devices, files over ``MAX_READ_BYTES`` and JSON nested deeper
than ``MAX_JSON_DEPTH``, so a wrong path gives an error instead of a hang, an exhausted memory or an
INTERNALERROR.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

#: Largest file a reader accepts (a baseline of 10,000 tests is about 6 MiB).
MAX_READ_BYTES = 64 * 2**20
#: Deepest JSON nesting a reader accepts (our documents nest 6 levels).
MAX_JSON_DEPTH = 64
#: Temp files are named ``.<target name>.<pid>.<random>.gpumem-tmp``.
TEMP_SUFFIX = ".gpumem-tmp"


class FileProblem(Exception):
    """A path we cannot read from or write to as asked; the message names the path and the reason."""


# --------------------------------------------------------------------------- reading


def read_bytes_bounded(path: str | os.PathLike[str], *, what: str, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; FileProblem for anything else.

    Opened non-blocking, so a FIFO is refused instead of waiting forever for a writer; FileNotFoundError
    is left to the caller, which knows what to suggest.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFoundError(path) from None
    except IsADirectoryError:
        raise FileProblem(f"{what} {path} is a directory, not a file") from None
    except OSError as exc:
        raise FileProblem(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise FileProblem(f"{what} {path} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(f"{what} {path} is not a regular file ({_kind(info.st_mode)}); give the path of a JSON file")
        if info.st_size > max_bytes:
            raise FileProblem(f"{what} {path} is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit; is it the right file?")
        chunks, size = [], 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:  # grew while we read
                raise FileProblem(f"{what} {path} is over the {max_bytes:,}-byte limit; is it the right file?")
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise FileProblem(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a plain file"


_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in JSON text (brackets inside strings ignored)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', raw)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json_bounded(raw: bytes, *, what: str, path: Any, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON bytes; FileProblem naming the file for bad UTF-8, bad JSON, deep nesting or huge numbers."""
    if json_depth(raw) > max_depth:
        raise FileProblem(f"{what} {path} nests arrays/objects deeper than {max_depth} levels; it is not a {what} file")
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant)
    except UnicodeDecodeError as exc:
        raise FileProblem(f"{what} {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise FileProblem(
            f"{what} {path} is not valid JSON (corrupt or truncated?): {exc.msg} at line {exc.lineno} "
            f"column {exc.colno}; restore it from version control or save it again"
        ) from None
    except ValueError as exc:  # an integer of more than 4300 digits, NaN/Infinity
        raise FileProblem(f"{what} {path} holds a value JSON readers refuse: {exc}") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --------------------------------------------------------------------------- checking outputs


def resolved(path: str | os.PathLike[str]) -> Path:
    """``path`` with symlinks, '..' and '.' resolved (the file a write would really reach)."""
    return Path(os.path.realpath(path))


def identity(path: Path) -> tuple:
    """What makes two spellings of a path the same file: (device, inode) when it exists, else the real path."""
    try:
        info = os.stat(path)
        return ("inode", info.st_dev, info.st_ino)
    except OSError:
        return ("path", os.path.normcase(str(resolved(path))))


def check_writable_file(path: Path, *, option: str) -> None:
    """Refuse an output path that is a directory, not a regular file, read-only, or in a folder we cannot write."""
    if path.is_dir():
        raise FileProblem(f"{option}={path} is a directory; give a file path such as {path / 'gpumem.json'}")
    if path.exists() and not path.is_file():
        raise FileProblem(f"{option}={path} is not a regular file ({_kind(os.stat(path).st_mode)}); give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise FileProblem(f"{option}={path} is read-only; make it writable or give another path")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise FileProblem(f"{option}={path}: {folder} is a file, so no folder can be created there")
    probe_folder(folder, option=f"{option}={path}")


def probe_folder(folder: Path, *, option: str) -> None:
    """Create and remove a temp file in ``folder``: the one reliable test (read-only mounts, ACLs, root)."""
    try:
        fd, name = _create_temp(folder, "probe")
    except OSError as exc:
        raise FileProblem(f"{option}: cannot write in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(name)


# --------------------------------------------------------------------------- writing


def temp_name(target: Path) -> Path:
    """A fresh temp path beside ``target``: ``.NAME.PID.RANDOM.gpumem-tmp`` (``remove_stale_temps`` knows it)."""
    return target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _create_temp(folder: Path, stem: str) -> tuple[int, str]:
    name = temp_name(folder / stem)
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600), str(name)


def remove_stale_temps(target: Path) -> list[Path]:
    """Delete temp files of ``target`` left by writers that no longer run (killed mid-save)."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[0-9a-f]+{re.escape(TEMP_SUFFIX)}$")
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            match = pattern.match(entry.name)
            if match and not _alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own earlier, interrupted write
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def write_text_atomic(path: str | os.PathLike[str], write: Callable[[TextIO], Any]) -> Path:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file.

    ``write`` is called with the open text stream. If it raises, the temp file is removed and an existing
    file at ``path`` is left byte-for-byte unchanged. A symlink at ``path`` is followed: its target is
    replaced, the link stays.
    """
    target = resolved(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = _create_temp(target.parent, target.name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp, _mode_for(target))
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return Path(path)


def _mode_for(target: Path) -> int:
    """Keep an existing file's permissions; a new file gets 0o666 less the umask (the temp file has 0o600)."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike[str], doc: Any, *, sort_keys: bool = False) -> Path:
    """Write ``doc`` as indented JSON with a trailing newline, atomically (see ``write_text_atomic``)."""

    def write(stream: TextIO) -> None:
        json.dump(doc, stream, indent=2, sort_keys=sort_keys, ensure_ascii=False, allow_nan=False)
        stream.write("\n")

    return write_text_atomic(path, write)


@contextlib.contextmanager
def folder_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive lock on the folder of ``path`` (read, merge and replace as one step).

    ``flock`` on the folder itself leaves no lock file behind. Where ``fcntl`` is missing (Windows),
    saves are still atomic but concurrent saves are not serialised.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    folder = resolved(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
