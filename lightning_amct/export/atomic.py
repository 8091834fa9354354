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
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path

_CHUNK = 1 << 20


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
    try:
        for path, content in files.items():
            staged.append((_write_temporary(Path(path), content), Path(path)))
    except BaseException:  # also KeyboardInterrupt: never leave temporary files behind
        for temporary, _ in staged:
            temporary.unlink(missing_ok=True)
        raise
    _rename_all(staged)
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
    os.close(handle)
    try:
        yield temporary
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _rename_all([(temporary, path)])
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


def _write_temporary(path: Path, content: bytes) -> Path:
    """Write ``content`` to a new temporary file beside ``path``, fsynced; return its path."""
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
    os.close(handle)
    return temporary


def _new_temporary(path: Path) -> tuple[int, Path]:
    """A new file beside ``path`` under a random hidden name, opened for writing: ``(descriptor, its path)``.

    Its permissions are those of any file the process creates (``0o666`` less the umask), which
    the final name keeps: a deploy model must be readable wherever a plain ``open`` would make it
    so (``tempfile.mkstemp`` gives ``0o600``).
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(temporary, flags, 0o666), temporary
        except FileExistsError:
            continue


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
