"""The committed ``_pb2`` modules are exactly what grpcio-tools generates from ``proto/``."""

from __future__ import annotations

from pathlib import Path

import pytest
from grpc_tools import protoc

REPO = Path(__file__).parents[2]


@pytest.mark.parametrize("name", ["retrain_config_pytorch", "scale_offset_record_pytorch"])
def test_generated_module_matches_the_proto(name: str, tmp_path: Path) -> None:
    status = protoc.main(["protoc", f"-I{REPO / 'proto'}", f"--python_out={tmp_path}", f"{name}.proto"])
    assert status == 0
    generated = (tmp_path / f"{name}_pb2.py").read_text()
    committed = (REPO / "lightning_amct" / "proto" / f"{name}_pb2.py").read_text()
    assert committed == generated, f"regenerate lightning_amct/proto/{name}_pb2.py from proto/{name}.proto"


def test_schema_keeps_the_reference_numbers_and_defaults() -> None:
    from lightning_amct.proto import retrain_config_pytorch_pb2 as pb

    top = pb.AMCTRetrainConfig.DESCRIPTOR.fields_by_name
    numbers = {name: field.number for name, field in top.items()}
    assert numbers == {
        "batch_num": 1, "retrain_data_quant_config": 2, "retrain_weight_quant_config": 3, "skip_layers": 4,
        "override_layer_configs": 5, "skip_layer_types": 6, "override_layer_types": 7, "prune_config": 8,
        "regular_prune_skip_layers": 9, "regular_prune_skip_types": 10, "quant_skip_layers": 11,
        "quant_skip_types": 12, "fakequant_precision_mode": 21,
    }  # fmt: skip
    assert pb.AMCTRetrainConfig().batch_num == 1
    assert pb.ActULQquantize().dst_type == pb.INT8
    assert pb.RetrainDataQuantConfig.DESCRIPTOR.fields_by_name["ulq_quantize"].number == 13
    assert pb.ClipMaxMin.DESCRIPTOR.fields_by_name["clip_max"].number == 3
    assert pb.ClipMaxMin.DESCRIPTOR.fields_by_name["clip_min"].number == 5
    assert pb.BalancedL2NormFilterPruner().ascend_optimized is True
    assert pb.L1SelectivePruner().n_out_of_m_type == pb.M4N2 and pb.L1SelectivePruner().update_freq == 0
    assert [pb.DataType.Name(i) for i in range(3)] == ["INT4", "INT8", "INT16"]
