"""Leftovers of killed writers: the next write of a name removes its stale temporary files, and
never a live writer's."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from lightning_amct.export import atomic
from lightning_amct.export.atomic import STALE_AFTER_SECONDS, write_files_atomically, written_atomically

pytestmark = pytest.mark.skipif(
    atomic.fcntl is None or not hasattr(os, "fork"), reason="locks and a writer killed in a forked process: POSIX"
)


def _temporaries(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.endswith(".tmp"))


def _age(path: Path, seconds: float) -> None:
    """Set the file's times ``seconds`` into the past."""
    past = time.time() - seconds
    os.utime(path, (past, past))


def _killed_writer(path: Path) -> Path:
    """The temporary file of a process killed (SIGKILL) half-way through writing ``path``."""
    before = set(_temporaries(path.parent))
    pid = os.fork()
    if pid == 0:  # the child: start the write, then die before it can clean up
        try:
            handle, _ = atomic._new_temporary(path)
            os.write(handle, b"half a checkpoint")
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    (leftover,) = [path.parent / name for name in set(_temporaries(path.parent)) - before]
    assert leftover.read_bytes() == b"half a checkpoint"
    return leftover


def test_the_next_write_removes_what_a_killed_writer_left(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt"
    leftover = _killed_writer(target)
    _age(leftover, STALE_AFTER_SECONDS + 1)
    write_files_atomically({target: b"complete"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]
    assert target.read_bytes() == b"complete"


def test_a_leftover_written_moments_ago_waits_for_a_later_write(tmp_path: Path) -> None:
    """Nobody holds its lock, but it was written within STALE_AFTER_SECONDS: it stays (the moment
    between a writer's creating its file and locking it looks the same)."""
    target = tmp_path / "model.ckpt"
    leftover = _killed_writer(target)
    write_files_atomically({target: b"complete"})
    assert _temporaries(tmp_path) == [leftover.name]
    _age(leftover, STALE_AFTER_SECONDS + 1)
    write_files_atomically({target: b"complete again"})
    assert _temporaries(tmp_path) == []


def test_a_live_writers_file_is_left_alone_however_old(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt"
    with written_atomically(target) as temporary:  # a writer of its own, slow: its file looks stale
        temporary.write_bytes(b"the live writer's")
        _age(temporary, 10 * STALE_AFTER_SECONDS)
        write_files_atomically({target: b"another writer's"})
        assert temporary.read_bytes() == b"the live writer's"
    assert target.read_bytes() == b"the live writer's"  # its rename came last
    assert _temporaries(tmp_path) == []


def test_only_the_temporaries_of_the_name_written_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "model.ckpt"
    leftover = _killed_writer(tmp_path / "other.ckpt")
    _age(leftover, STALE_AFTER_SECONDS + 1)
    others = [tmp_path / ".model.ckpt.bak.tmp", tmp_path / ".other.ckpt.0123abcd.tmp", tmp_path / "model.ckpt.tmp"]
    for other in others:
        other.write_bytes(b"the user's")
        _age(other, STALE_AFTER_SECONDS + 1)
    write_files_atomically({target: b"complete"})
    assert all(other.read_bytes() == b"the user's" for other in others)
    assert leftover.exists()
