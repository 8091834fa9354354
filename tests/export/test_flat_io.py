"""Models that take or return dicts of tensors, through both exporters, ONNX Runtime and a reload."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_amct import compress_model
from lightning_amct.export import export_onnx, freeze_model, load_compressed, save_compressed
from lightning_amct.export.flat_io import flat_io


class TwoHeads(nn.Module):
    """A batch dict in, a dict with a nested list out."""

    def __init__(self) -> None:
        super().__init__()
        self.image, self.features = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(5, 8)
        self.cls, self.boxes = nn.Linear(16, 4), nn.Conv2d(8, 2, 1)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, object]:
        h = F.relu(self.image(batch["image"]))
        joint = torch.cat([h.mean((2, 3)), F.relu(self.features(batch["features"]))], 1)
        return {"logits": self.cls(joint), "extra": [self.boxes(h), joint]}


def _batch(size: int) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(size, 3, 6, 6), "features": torch.randn(size, 5)}


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_dict_inputs_and_outputs_are_named_tensors_of_the_onnx_model(exporter: str) -> None:
    torch.manual_seed(0)
    model, batch = TwoHeads().eval(), _batch(3)
    proto = export_onnx(model, (_batch(1),), exporter=exporter)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image", "features"]
    assert [o.name for o in session.get_outputs()] == ["logits", "extra.0", "extra.1"]
    got = session.run(None, {name: x.numpy() for name, x in batch.items()})
    with torch.no_grad():
        expected = model(batch)
    for value, want in zip(got, [expected["logits"], *expected["extra"]]):
        torch.testing.assert_close(torch.from_numpy(value), want, rtol=1e-5, atol=1e-5)
    assert "forward" not in model.__dict__  # its own forward again


def test_tensors_in_and_a_tensor_out_keep_plain_names_and_forward() -> None:
    model = nn.Linear(2, 2)
    with flat_io(model, (torch.zeros(1, 2),)) as (inputs, names):
        assert names == {"input_names": ["input"], "output_names": ["output"]} and "forward" not in model.__dict__


def test_an_output_that_is_not_a_tensor_is_left_out_by_name_and_an_input_refused() -> None:
    class WithCount(nn.Module):
        def forward(self, x: torch.Tensor, scale: object = None) -> dict[str, object]:
            return {"y": x, "count": 3}

    with pytest.warns(UserWarning, match=r"leaves out the outputs that are not tensors: 'count' \(int\)"):
        proto = export_onnx(WithCount(), (torch.zeros(1, 2),))
    assert [o.name for o in proto.graph.output] == ["y"]
    with pytest.raises(ValueError, match="the model's input 'input_1' is float"):
        with flat_io(WithCount(), (torch.zeros(1), 2.0)):
            pass


def test_a_compressed_dict_model_saves_reloads_and_deploys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, batch = TwoHeads(), _batch(16)
    compress_model(model, "retrain_data_quant_config { ulq_quantize {} }", (_batch(1),))
    model.train()(batch)  # calibration
    model.eval()
    paths = save_compressed(model, tmp_path, (_batch(1),))
    loaded, frozen = load_compressed(paths["checkpoint"], TwoHeads()), freeze_model(model, (_batch(1),))
    with torch.no_grad():
        expected = frozen.module(batch)
        torch.testing.assert_close(loaded(batch), expected)
    session = ort.InferenceSession(str(paths["deploy_onnx"]), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {name: x.numpy() for name, x in batch.items()})[0]
    cls = frozen.layers["cls"]
    step = cls.activation.scale * float(cls.weight().abs().sum(dim=1).max()) + 1e-4
    torch.testing.assert_close(torch.from_numpy(logits), expected["logits"], rtol=0, atol=step)
