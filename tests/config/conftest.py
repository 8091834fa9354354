"""Fixtures of the config tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lightning_amct.config import load_config
from lightning_amct.proto.retrain_config_pytorch_pb2 import AMCTRetrainConfig


@pytest.fixture
def load_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], AMCTRetrainConfig]:
    """Load config text the way a user does: from ``quant.cfg`` in the working directory.

    Errors then read ``quant.cfg:LINE:COLUMN: ...`` with ``path == "quant.cfg"``.
    """
    monkeypatch.chdir(tmp_path)

    def load(text: str) -> AMCTRetrainConfig:
        Path("quant.cfg").write_text(text)
        return load_config("quant.cfg")

    return load
