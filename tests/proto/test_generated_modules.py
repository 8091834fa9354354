"""The committed ``_pb2`` modules are what grpcio-tools generates from ``proto/``, and they load
next to AMCT's own modules of the same schema in one process."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import text_format
from grpc_tools import protoc

from lightning_amct.config import load_config
from lightning_amct.proto import scale_offset_record_pytorch_pb2

REPO = Path(__file__).parents[2]
SCHEMAS = ["retrain_config_pytorch", "scale_offset_record_pytorch"]
AMCT_PACKAGE = "AMCTPytorchProto"


def _compile(proto_path: str, name: str, out: Path) -> None:
    status = protoc.main(["protoc", f"-I{proto_path}", f"--python_out={out}", name])
    assert status == 0


@pytest.mark.parametrize("name", SCHEMAS)
def test_generated_module_matches_the_proto(name: str, tmp_path: Path) -> None:
    # The schema's registered name is lightning_amct/proto/NAME.proto: unique in the descriptor pool.
    _compile(f"lightning_amct/proto={REPO / 'proto'}", f"lightning_amct/proto/{name}.proto", tmp_path)
    generated = (tmp_path / "lightning_amct" / "proto" / f"{name}_pb2.py").read_text()
    committed = (REPO / "lightning_amct" / "proto" / f"{name}_pb2.py").read_text()
    assert committed == generated, (
        f"regenerate: python -m grpc_tools.protoc -Ilightning_amct/proto=proto --python_out=. "
        f"lightning_amct/proto/{name}.proto"
    )


def amct_modules(folder: Path, registered_as: str) -> dict[str, Path]:
    """AMCT's modules of the same schemas, generated into ``folder``: AMCT's package, and each
    file registered in the descriptor pool as ``registered_as.format(name=...)``."""
    for name in SCHEMAS:
        source = folder / registered_as.format(name=name)
        source.parent.mkdir(parents=True, exist_ok=True)
        ours = (REPO / "proto" / f"{name}.proto").read_text()
        source.write_text(re.sub(r"^package \w+;", f"package {AMCT_PACKAGE};", ours, flags=re.MULTILINE))
        _compile(str(folder), registered_as.format(name=name), folder)
    return {name: folder / registered_as.format(name=name).replace(".proto", "_pb2.py") for name in SCHEMAS}


def _import_file(module_name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_amct_modules_load_after_ours_and_read_the_same_config(tmp_path: Path) -> None:
    paths = amct_modules(tmp_path, "amct_pytorch/proto/{name}.proto")
    amct = {name: _import_file(f"amct_{name}_pb2", path) for name, path in paths.items()}
    assert amct["retrain_config_pytorch"].DataType.DESCRIPTOR.full_name == f"{AMCT_PACKAGE}.DataType"

    for recipe in ("quant", "prune", "compressed2"):
        text = (REPO / "recipes" / f"{recipe}.cfg").read_text()
        theirs = text_format.Parse(text, amct["retrain_config_pytorch"].AMCTRetrainConfig())
        ours = load_config(REPO / "recipes" / f"{recipe}.cfg")
        assert ours.SerializeToString(deterministic=True) == theirs.SerializeToString(deterministic=True)
        assert text_format.MessageToString(ours) == text_format.MessageToString(theirs)

    record = scale_offset_record_pytorch_pb2.ScaleOffsetRecord()
    text_format.Parse('record { key: "fc" value { scale_d: 0.5 offset_d: 3 } }', record)
    same = amct["scale_offset_record_pytorch"].ScaleOffsetRecord()
    text_format.Parse(text_format.MessageToString(record), same)
    assert text_format.MessageToString(same) == text_format.MessageToString(record)


def test_ours_load_after_amct_modules(tmp_path: Path) -> None:
    """The other order needs a fresh process: AMCT's modules first (registered under the file
    names this project's had before), then lightning_amct."""
    paths = amct_modules(tmp_path, "{name}.proto")
    modules = {f"amct_{name}_pb2": str(path) for name, path in paths.items()}
    script = f"""
import importlib.util
for name, path in {modules!r}.items():
    spec = importlib.util.spec_from_file_location(name, path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
from lightning_amct.config import load_config
print(load_config({str(REPO / "recipes" / "quant.cfg")!r}).skip_layers[0])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "net.stem.conv"
