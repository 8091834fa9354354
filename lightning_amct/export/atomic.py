"""All-or-nothing file writes: a set of files appears complete under its final names, or not at all.

Why: an export interrupted by a full disk, a crash or Ctrl-C must not leave a truncated
checkpoint or ONNX file under a name a deployment script picks up, and must not destroy the good
files of an earlier export. :func:`write_files_atomically` writes every file to a temporary file
in the destination directory (same file system, so the final rename is atomic), flushes it to
disk with ``fsync``, and only when **all** of them are written renames each onto its final name
with ``os.replace``. Any failure before the renames removes the temporary files and leaves the
final names as they were. The renames hardly fail (same directory, names already checked); where
one does, or Ctrl-C stops them, the files that the earlier ones replaced are put back from hard
links kept until all are done. Only a process killed between two renames (microseconds) leaves a
mix. The directory is fsynced after them so the new names survive a power loss.

A process killed while it writes (SIGKILL, the out-of-memory killer, a power loss) cannot remove
its temporary file: a hidden ``.<name>.<random>.tmp`` beside the final name, as large as the
checkpoint was going to be. The next write of that name removes such leftovers
(:func:`_remove_stale_temporaries`). A writer holds an exclusive lock (``flock``) on its temporary
file until the rename, so a temporary file is a leftover where nobody holds its lock and nobody
has written it for :data:`STALE_AFTER_SECONDS`; a live writer's file, on this machine or, over
NFS, on another, is left alone. Without ``flock`` (Windows), an open file cannot be removed there.

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_files_atomically({folder / "a.txt": b"alpha", folder / "b.txt": b"beta"})
    >>> sorted(p.name for p in folder.iterdir()), (folder / "b.txt").read_bytes()
    (['a.txt', 'b.txt'], b'beta')
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks (an open file cannot be removed there instead)
    fcntl = None

_CHUNK = 1 << 20
#: A temporary file that nobody holds locked and nobody wrote for this long is a leftover of a
#: killed writer. Far longer than a live writer leaves its file unlocked: the microseconds between
#: creating it and taking the lock, or between a writer of its own (``trainer.save_checkpoint``
#: through fsspec) putting a new file in its place and the rename.
STALE_AFTER_SECONDS = 60.0


class ArtifactWriteError(OSError):
    """An artifact could not be written; the message names the path. No partial file was left."""


def directory_obstacle(directory: str | Path) -> str | None:
    """Why files cannot be written into ``directory`` (created if missing), or None where they can:
    checked before a long run writes there at its end.

    Example:
        >>> import tempfile
        >>> taken = Path(tempfile.mkdtemp()) / "a_file"
        >>> _ = taken.write_text("the user's")
        >>> directory_obstacle(taken / "compressed")
        '... is a file, not a directory'
    """
    existing = Path(directory)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write into {existing}: permission denied"
    return None


def write_files_atomically(files: Mapping[Path, bytes]) -> None:
    """Write every ``path: content`` pair, all or nothing (see the module docstring).

    Args:
        files: final paths (their directories are created) and their complete contents.

    Raises:
        ArtifactWriteError: a directory could not be created or a file could not be written
            (read-only directory, a path under a file, disk full...); the message names the path
            and the cause. Final names are untouched.
    """
    staged: list[tuple[Path, Path]] = []
    handles: list[int] = []  # open, and so locked, until the renames are done
    try:
        try:
            for path, content in files.items():
                temporary, handle = _write_temporary(Path(path), content)
                staged.append((temporary, Path(path)))
                handles.append(handle)
        except BaseException:  # also KeyboardInterrupt: never leave temporary files behind
            for temporary, _ in staged:
                temporary.unlink(missing_ok=True)
            raise
        _rename_all(staged)
    finally:
        for handle in handles:
            os.close(handle)
    for directory in {path.parent for _, path in staged}:
        _fsync_directory(directory)


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer of its own (``trainer.save_checkpoint``),
    renamed onto ``path`` when the block ends, removed if it fails.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "float.ckpt"
        >>> with written_atomically(target) as temporary:
        ...     _ = temporary.write_bytes(b"weights")
        >>> target.read_bytes()
        b'weights'
    """
    path = Path(path)
    handle, temporary = _new_temporary(path)
    try:  # the handle stays open, and so locked, until the rename
        try:
            yield temporary
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        _rename_all([(temporary, path)])
    finally:
        os.close(handle)
    _fsync_directory(path.parent)


def _rename_all(staged: list[tuple[Path, Path]]) -> None:
    """Rename each temporary file onto its final name; where one rename fails (or is interrupted),
    put back the files the earlier ones replaced, from hard links kept until all are done."""
    done: list[tuple[Path, bool, Path | None]] = []  # final name, whether it existed, a link to that file
    path = Path()
    try:
        for temporary, path in staged:
            existed = path.exists()
            old = _link_to(path) if existed else None
            try:
                os.replace(temporary, path)
            except BaseException:
                if old is not None:
                    old.unlink(missing_ok=True)
                raise
            done.append((path, existed, old))
    except BaseException as exc:
        for final, existed, old in reversed(done):
            if not existed:
                final.unlink(missing_ok=True)
            elif old is not None:  # (a file system without hard links keeps the new file)
                os.replace(old, final)
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ArtifactWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    for _, _, old in done:
        if old is not None:
            old.unlink(missing_ok=True)


def _link_to(path: Path) -> Path | None:
    """A new hidden hard link to the file at ``path``, to put it back with; None where the file
    system has no hard links."""
    while True:
        link = path.with_name(f".{path.name}.{secrets.token_hex(4)}.old")
        try:
            os.link(path, link)
            return link
        except FileExistsError:
            continue
        except OSError:
            return None


def _write_temporary(path: Path, content: bytes) -> tuple[Path, int]:
    """Write ``content`` to a new temporary file beside ``path``, fsynced; return its path and its
    handle, still open (and so locked): the caller closes it after the rename."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise IsADirectoryError(f"{path} is a directory")
        handle, temporary = _new_temporary(path)
    except OSError as exc:
        raise ArtifactWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        view = memoryview(content)
        for start in range(0, len(view), _CHUNK):
            chunk = view[start : start + _CHUNK]
            while chunk:
                chunk = chunk[os.write(handle, chunk) :]
        os.fsync(handle)
    except BaseException as exc:
        os.close(handle)
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ArtifactWriteError(exc.errno, f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
    return temporary, handle


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` under a random hidden name, opened for writing and locked:
    ``(descriptor, its path)``; leftovers of killed writers of ``path`` removed first.

    Its permissions are those of any file the process creates (``0o666`` less the umask), which
    the final name keeps: a deploy model must be readable wherever a plain ``open`` would make it
    so (``tempfile.mkstemp`` gives ``0o600``).
    """
    _remove_stale_temporaries(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            handle = os.open(temporary, flags, 0o666)
        except FileExistsError:
            continue
        _try_lock(handle)
        return handle, temporary


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temporary files of ``path`` that killed writers left (see the module docstring).

    Best effort: a directory that cannot be listed, a file that cannot be opened, locked or
    removed is left as it is, and the write goes on.
    """
    name = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{8}}\.tmp")
    try:
        candidates = [entry for entry in os.scandir(path.parent) if name.fullmatch(entry.name)]
    except OSError:
        return
    for entry in candidates:
        with contextlib.suppress(OSError):  # gone already, a link, not readable, not removable
            if fcntl is None:  # Windows: the open file of a live writer cannot be removed
                if _stale(entry.stat(follow_symlinks=False)):
                    os.unlink(entry.path)
                continue
            _remove_if_unlocked_and_stale(entry.path)


def _remove_if_unlocked_and_stale(path: str) -> None:
    """Remove the temporary file at ``path`` where nobody holds its lock and it is :func:`_stale`."""
    handle = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        if not _try_lock(handle):
            return  # a live writer's
        status = os.fstat(handle)
        if _stale(status) and os.stat(path, follow_symlinks=False).st_ino == status.st_ino:  # still that file
            os.unlink(path)
    finally:
        os.close(handle)


def _stale(status: os.stat_result) -> bool:
    """Whether a file of this status was last written :data:`STALE_AFTER_SECONDS` ago or more."""
    return time.time() - status.st_mtime >= STALE_AFTER_SECONDS


def _try_lock(handle: int) -> bool:
    """Take an exclusive lock on the open file without waiting: False where another open of it
    holds one; True where taken, or where there are no locks (no ``flock``, a file system without)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks
        pass
    return True


def _fsync_directory(directory: Path) -> None:
    """Make renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some file systems refuse fsync on directories; the renames are done regardless
    finally:
        os.close(handle)
