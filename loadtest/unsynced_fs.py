"""A FUSE file system that forgets what was not fsynced: a power cut for one directory.

``python -m loadtest.unsynced_fs BACKING MOUNTPOINT`` mounts ``BACKING`` at ``MOUNTPOINT``
(in the foreground, until unmounted or killed). Reads see every write, as on any file system;
but file data reaches ``BACKING`` only through ``fsync``/``fdatasync``: until then each write
and truncate waits in this process's memory, per file, in order. ``kill -9`` of this process
(then ``umount -l MOUNTPOINT``) is therefore a power cut: whatever was written and not synced
is gone, the worst a kernel's page cache can do (a real one may have written some of it back).
Metadata (create, rename, unlink, mkdir) goes to ``BACKING`` at once, as on a journalling file
system that orders metadata after data; a renamed or unlinked file's unsynced data goes with
it (RocksDB fsyncs a file before renaming it into place, and fsyncs directories).

Used by ``python -m loadtest.crash --power-loss`` (kefu's data directory inside the mount).
Needs ``/dev/fuse``, the right to mount (root, or ``fusermount``), libfuse 2 (Debian:
``libfuse2``) and the ``fusepy`` package; :func:`available` says whether they are there.

Bounds: the unsynced writes of one file are kept until its next sync, at most
:data:`MAX_PENDING_BYTES` in all; past that a write fails with ``ENOSPC`` (a file system that
is full, which the writer must survive). Single-threaded (``nothreads``): operations are
serialised, so a read always sees the writes before it.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path
from typing import Any

#: Unsynced bytes held over all files; a write past it fails with ENOSPC.
MAX_PENDING_BYTES = 512 << 20

_STAT_KEYS = (
    "st_atime",
    "st_ctime",
    "st_gid",
    "st_mode",
    "st_mtime",
    "st_nlink",
    "st_size",
    "st_uid",
    "st_ino",
)


def available() -> str | None:
    """None when a mount can be tried here; otherwise why not."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        import fuse  # type: ignore[import-untyped]  # noqa: F401
    except (ImportError, OSError) as e:  # fusepy absent, or libfuse.so.2 not found
        return f"fusepy/libfuse2 not usable: {e}"
    if os.geteuid() != 0 and shutil.which("fusermount") is None:
        return "not root and no fusermount"
    return None


class _File:
    """The unsynced state of one file: its operations in order and its logical size."""

    __slots__ = ("ops", "size")

    def __init__(self, size: int) -> None:
        self.ops: list[tuple[int, bytes | None, int]] = []  # (offset, data | None=truncate, n)
        self.size = size


def make_operations(root: str) -> Any:
    from fuse import FuseOSError, Operations

    class UnsyncedFS(Operations):  # type: ignore[misc]
        """Passthrough to ``root``; file data only on fsync (module doc)."""

        def __init__(self) -> None:
            self.root = root
            self.files: dict[str, _File] = {}
            self.pending_bytes = 0

        def _p(self, path: str) -> str:
            return self.root + path

        def _state(self, path: str) -> _File:
            st = self.files.get(path)
            if st is None:
                st = self.files[path] = _File(os.lstat(self._p(path)).st_size)
            return st

        # -- metadata ------------------------------------------------------------------

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            try:
                st = os.lstat(self._p(path))
            except OSError as e:
                raise FuseOSError(e.errno) from None
            out = {k: getattr(st, k) for k in _STAT_KEYS}
            f = self.files.get(path)
            if f is not None:
                out["st_size"] = f.size
            return out

        def readdir(self, path: str, fh: int) -> list[str]:
            return [".", "..", *os.listdir(self._p(path))]

        def access(self, path: str, amode: int) -> int:
            if not os.access(self._p(path), amode):
                raise FuseOSError(errno.EACCES)
            return 0

        def chmod(self, path: str, mode: int) -> int:
            os.chmod(self._p(path), mode)
            return 0

        def chown(self, path: str, uid: int, gid: int) -> int:
            os.chown(self._p(path), uid, gid)
            return 0

        def utimens(self, path: str, times: tuple[float, float] | None = None) -> int:
            os.utime(self._p(path), times)
            return 0

        def mkdir(self, path: str, mode: int) -> int:
            os.mkdir(self._p(path), mode)
            return 0

        def rmdir(self, path: str) -> int:
            os.rmdir(self._p(path))
            return 0

        def unlink(self, path: str) -> int:
            os.unlink(self._p(path))
            self._forget(path)
            return 0

        def rename(self, old: str, new: str) -> int:
            os.rename(self._p(old), self._p(new))
            self._forget(new)
            moved = self.files.pop(old, None)
            if moved is not None:
                self.files[new] = moved
            return 0

        def link(self, target: str, source: str) -> int:
            os.link(self._p(source), self._p(target))
            return 0

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self._p(path))
            keys: tuple[str, ...] = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail")
            keys += ("f_ffree", "f_files", "f_flag", "f_frsize", "f_namemax")
            return {k: getattr(sv, k) for k in keys}

        def _forget(self, path: str) -> None:
            f = self.files.pop(path, None)
            if f is not None:
                self.pending_bytes -= sum(n for _o, _d, n in f.ops)

        # -- data ----------------------------------------------------------------------

        def create(self, path: str, mode: int, fi: Any = None) -> int:
            fd = os.open(self._p(path), os.O_RDWR | os.O_CREAT, mode)
            self._state(path)
            return fd

        def open(self, path: str, flags: int) -> int:
            acc = flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)
            fd = os.open(self._p(path), os.O_RDWR if acc != os.O_RDONLY else os.O_RDONLY)
            if flags & os.O_TRUNC:
                self.truncate(path, 0)
            return fd

        def release(self, path: str, fh: int) -> int:
            os.close(fh)  # closing is no sync
            return 0

        def flush(self, path: str, fh: int) -> int:
            return 0

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            f = self.files.get(path)
            if f is None:
                return os.pread(fh, size, offset)
            end = min(offset + size, f.size)
            if end <= offset:
                return b""
            buf = bytearray(os.pread(fh, end - offset, offset))
            buf.extend(b"\0" * (end - offset - len(buf)))
            for o, data, n in f.ops:
                if data is None:  # truncate to o: what lay beyond reads as zeros
                    if o < end:
                        start = max(o, offset) - offset
                        buf[start:] = b"\0" * (len(buf) - start)
                    continue
                lo, hi = max(o, offset), min(o + n, end)
                if lo < hi:
                    buf[lo - offset : hi - offset] = data[lo - o : hi - o]
            return bytes(buf)

        def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
            if self.pending_bytes + len(data) > MAX_PENDING_BYTES:
                raise FuseOSError(errno.ENOSPC)
            f = self._state(path)
            f.ops.append((offset, bytes(data), len(data)))
            f.size = max(f.size, offset + len(data))
            self.pending_bytes += len(data)
            return len(data)

        def truncate(self, path: str, length: int, fh: int | None = None) -> int:
            f = self._state(path)
            f.ops.append((length, None, 0))
            f.size = length
            return 0

        def fsync(self, path: str, datasync: int, fh: int) -> int:
            f = self.files.pop(path, None)
            if f is not None:
                fd = os.open(self._p(path), os.O_WRONLY)
                try:
                    for o, data, _n in f.ops:
                        if data is None:
                            os.ftruncate(fd, o)
                        else:
                            os.pwrite(fd, data, o)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                self.pending_bytes -= sum(n for _o, _d, n in f.ops)
            return 0

        def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
            return 0  # metadata is on the backing directory already

    return UnsyncedFS()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m loadtest.unsynced_fs BACKING MOUNTPOINT", file=sys.stderr)
        return 2
    why = available()
    if why is not None:
        print(f"unsynced_fs: cannot mount: {why}", file=sys.stderr)
        return 1
    from fuse import FUSE

    backing, mountpoint = (str(Path(a).resolve()) for a in args)
    FUSE(make_operations(backing), mountpoint, foreground=True, nothreads=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
