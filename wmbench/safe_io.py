"""Crash-safe file writes: a temporary file in the same directory, fsync, rename, fsync the directory."""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from pathlib import Path

# Files in a cache may be shared with others: never follow a symlink planted in place of one.
NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def probe_writable(folder: Path) -> None:
    """Raise, naming ``folder``, the OSError a write into it would raise (read-only, immutable, no
    permission) now rather than after the work whose results go there: a probe file is created
    there and removed. A folder still to be made is probed in its nearest existing parent (where it
    would be made); nothing is left behind either way."""
    import tempfile

    folder = Path(folder)
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # "." or "/" at the latest
    try:
        fd, probe = tempfile.mkstemp(prefix=".wmbench-probe-", dir=existing)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(existing)) from None
    os.close(fd)
    os.unlink(probe)


def special_file(path: Path) -> bool:
    """Whether ``path`` is an existing entry that is neither a regular file nor a folder (a FIFO, a
    socket, a device such as /dev/zero): opening it may wait forever, reading it may never end. An
    input read whole is refused so, before it is opened."""
    return path.exists() and not path.is_file() and not path.is_dir()


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the whole new one, never a part.

    The temporary file is created with ``mode`` from the start (0600 keys are never readable by
    others, not even for a moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except OSError as exc:  # name the file asked for, not the hidden temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        write_all(fd, data, tmp)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_all(fd: int, data: bytes, path: Path) -> None:
    """Write every byte of ``data``; a write that makes no progress (a full disk) is ENOSPC."""
    view = memoryview(data)
    while view:
        written = _write(fd, view, path)
        if written <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        view = view[written:]


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, refusing to follow a symlink (ELOOP) and a directory (EISDIR, named)."""
    fd = os.open(path, os.O_RDONLY | NOFOLLOW)
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The string metadata in the header of a safetensors file's bytes (ValueError if malformed)."""
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return dict(header.get("__metadata__") or {})


def append_line(path: Path, line: bytes, mode: int = 0o644) -> None:
    """Append ``line`` with one write() and fsync (not through a symlink). A short write (a full
    disk) is undone and raised as ENOSPC, so no torn line is left; a torn line left by a crash
    before is sealed with a newline first."""
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | NOFOLLOW, mode)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        written = _write(fd, line, path)
        if written != len(line):
            os.ftruncate(fd, size)
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (short write of {written} of {len(line)} bytes)", str(path))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(fd: int, data: bytes | memoryview, path: Path) -> int:
    """os.write, its error naming ``path`` (a full disk says which file it stopped)."""
    try:
        return os.write(fd, data)
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise
