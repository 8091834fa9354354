"""Unwritable directories, a disk that fills up, an interrupted write: a clear error naming the
path, no partial file under a final name, and the files of an earlier export intact."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch

from lightning_amct import compress_model
from lightning_amct.demo import DemoClassifier
from lightning_amct.export import ArtifactWriteError, save_compressed
from lightning_amct.export.save import ARTIFACTS


RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def model() -> DemoClassifier:
    """A small compressed demo; quant.cfg gives every clip, so it exports without training."""
    torch.manual_seed(0)
    module = DemoClassifier(width=16)
    compress_model(module, RECIPES / "quant.cfg", module.example_input_array)
    return module.eval()


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_output_dir_under_a_file_is_a_clear_error(model: DemoClassifier, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file")
    with pytest.raises(ArtifactWriteError, match="cannot write into .*not_a_dir is a file, not a directory"):
        save_compressed(model, blocker / "export")
    assert blocker.read_text() == "a file" and sorted(tmp_path.iterdir()) == [blocker]


def test_a_final_name_taken_by_a_directory_writes_nothing(model: DemoClassifier, tmp_path: Path) -> None:
    (tmp_path / f"model{ARTIFACTS['report_md']}").mkdir()
    with pytest.raises(ArtifactWriteError, match="model_report.md"):
        save_compressed(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["model_report.md"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs POSIX permissions without root")
def test_read_only_directory_is_a_clear_error(model: DemoClassifier, tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(ArtifactWriteError, match=str(tmp_path)):
            save_compressed(model, tmp_path)
    finally:
        tmp_path.chmod(0o700)
    assert list(tmp_path.iterdir()) == []


def _failing_write(monkeypatch: pytest.MonkeyPatch, budget: int, error: BaseException) -> None:
    """Fault injection: ``os.write`` writes ``budget`` bytes for real, then raises ``error``."""
    real_write = os.write
    left = [budget]

    def write(fd: int, data: bytes) -> int:
        if left[0] <= 0:
            raise error
        written = real_write(fd, bytes(data[: left[0]]))
        left[0] -= written
        return written

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5, 0.95])
def test_disk_full_mid_export_keeps_the_previous_export(
    model: DemoClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fraction: float
) -> None:
    save_compressed(model, tmp_path)
    before = _snapshot(tmp_path)
    # The disk fills up at the first byte, inside the first file, mid-way, or near the last file.
    budget = int(fraction * sum(len(content) for content in before.values()))
    _failing_write(monkeypatch, budget, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with torch.no_grad():
        model.net.fc.weight.add_(1.0)  # a different model: every artifact would change
    try:
        with pytest.raises(ArtifactWriteError, match=f"cannot write {tmp_path}.*No space left") as caught:
            save_compressed(model, tmp_path)
    finally:
        with torch.no_grad():
            model.net.fc.weight.sub_(1.0)
    assert caught.value.errno == errno.ENOSPC
    assert _snapshot(tmp_path) == before  # same names (no temporary file left), same bytes


def test_interrupted_export_leaves_no_file(
    model: DemoClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _failing_write(monkeypatch, 20_000, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, tmp_path / "export")
    assert list((tmp_path / "export").iterdir()) == []


def test_a_successful_export_writes_exactly_the_artifacts(model: DemoClassifier, tmp_path: Path) -> None:
    paths = save_compressed(model, tmp_path, prefix="demo")
    assert set(paths) == set(ARTIFACTS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"demo{suffix}" for suffix in ARTIFACTS.values())


@pytest.mark.skipif(os.name != "posix", reason="file modes and the umask are POSIX's")
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_the_artifacts_get_the_permissions_of_any_new_file(model: DemoClassifier, tmp_path: Path, umask: int) -> None:
    """A deploy model is readable by whoever may read the process's other files (a serving container)."""
    previous = os.umask(umask)
    try:
        paths = save_compressed(model, tmp_path)
        (tmp_path / "plain").write_bytes(b"")
    finally:
        os.umask(previous)
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert {path.name: path.stat().st_mode & 0o777 for path in paths.values()} == {
        path.name: expected for path in paths.values()
    }


@pytest.mark.parametrize("failure", [OSError(errno.EIO, os.strerror(errno.EIO)), KeyboardInterrupt()])
def test_a_rename_that_fails_midway_puts_the_earlier_files_back(
    failure: BaseException, model: DemoClassifier, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_compressed(model, tmp_path)
    before = _snapshot(tmp_path)
    renames = []

    def third_fails(source: object, target: object) -> None:
        renames.append(target)
        if len(renames) == 3:
            raise failure
        os.rename(source, target)

    monkeypatch.setattr("lightning_amct.export.atomic.os.replace", third_fails)
    with torch.no_grad():
        model.net.fc.weight.add_(1.0)  # every artifact would change
    try:
        with pytest.raises(type(failure)) as caught:
            save_compressed(model, tmp_path)
    finally:
        with torch.no_grad():
            model.net.fc.weight.sub_(1.0)
    if isinstance(failure, OSError):
        assert isinstance(caught.value, ArtifactWriteError) and str(renames[2]) in str(caught.value)
    assert _snapshot(tmp_path) == before  # the first two put back, no temporary file or link left


def test_a_prefix_with_a_path_separator_is_refused(model: DemoClassifier, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prefix must be a non-empty file name part without path separators"):
        save_compressed(model, tmp_path, prefix="a/b")
    assert list(tmp_path.iterdir()) == []
