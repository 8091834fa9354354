"""``load_compressed`` refuses what does not fit, with a message that says what to do."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_amct import compress_model
from lightning_amct.demo import DemoClassifier, DemoNet
from lightning_amct.export import CheckpointMismatchError, load_compressed, save_compressed

RECIPES = Path(__file__).parents[2] / "recipes"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A channel-pruned, quantized, untrained DemoClassifier(width=32), saved."""
    torch.manual_seed(0)
    module = DemoClassifier(width=32)
    compress_model(module, RECIPES / "compressed1.cfg", module.example_input_array)
    return save_compressed(module.eval(), tmp_path_factory.mktemp("saved"))["checkpoint"]


def test_loads_into_a_fresh_instance_of_the_saved_class(checkpoint: Path) -> None:
    model = load_compressed(checkpoint, DemoClassifier(width=32))
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_a_class_name_instead_of_a_model_is_a_clear_error(checkpoint: Path) -> None:
    with pytest.raises(TypeError, match="load_compressed loads into a model instance .* got a str: 'DemoClassifier'"):
        load_compressed(checkpoint, "DemoClassifier")


def test_without_a_model_it_says_which_class_to_construct(checkpoint: Path) -> None:
    with pytest.raises(ValueError, match=r"pass a freshly constructed lightning_amct\.demo\.module\.DemoClassifier"):
        load_compressed(checkpoint)


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (lambda: DemoClassifier(width=64), "does not fit this DemoClassifier"),  # other widths
        (lambda: DemoNet(width=32), "model has no such layer"),  # another class
    ],
)
def test_a_checkpoint_of_another_model_is_a_clear_error(checkpoint: Path, model, match: str) -> None:
    with pytest.raises(CheckpointMismatchError, match=match) as caught:
        load_compressed(checkpoint, model())
    message = str(caught.value)
    assert str(checkpoint) in message and "saved from lightning_amct.demo.module.DemoClassifier" in message


def test_an_instance_compressed_with_another_config_is_refused(checkpoint: Path) -> None:
    other = DemoClassifier(width=32)
    compress_model(other, RECIPES / "quant.cfg", other.example_input_array)
    with pytest.raises(ValueError, match="already compressed"):
        load_compressed(checkpoint, other)


def test_a_file_that_is_not_a_compressed_checkpoint_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "float.pt"
    torch.save(DemoClassifier(width=32).state_dict(), plain)
    with pytest.raises(ValueError, match="not a lightning-amct compressed checkpoint"):
        load_compressed(plain, DemoClassifier(width=32))


@pytest.mark.parametrize("keep", [0.0, 0.1, 0.5, 0.99])
def test_a_truncated_checkpoint_is_one_error_naming_the_file(keep: float, checkpoint: Path, tmp_path: Path) -> None:
    data = checkpoint.read_bytes()
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(data[: int(len(data) * keep)])
    message = rf"^{damaged} cannot be read as a compressed checkpoint, truncated or damaged"
    with pytest.raises(ValueError, match=message):
        load_compressed(damaged, DemoClassifier(width=32))


def _largest_tensor(value: object) -> torch.Tensor | None:
    """The checkpoint's largest tensor (nested in its dicts and lists)."""
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    found = [t for t in map(_largest_tensor, items) if t is not None]
    return max(found, key=torch.Tensor.numel, default=None)


def test_a_flipped_bit_in_a_weight_is_found_and_named(checkpoint: Path, tmp_path: Path) -> None:
    """torch.load reads such a file without complaint (checked below): the digest finds it."""
    data = bytearray(checkpoint.read_bytes())
    weight = _largest_tensor(torch.load(checkpoint, weights_only=True)).contiguous()
    start = bytes(data).find(weight.view(torch.uint8).numpy().tobytes())
    assert start > 0 and weight.numel() > 100
    data[start + weight.numel() * weight.element_size() // 2] ^= 0x10
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(bytes(data))
    assert not torch.equal(_largest_tensor(torch.load(damaged, weights_only=True)), weight)
    with pytest.raises(ValueError, match=rf"^{damaged} is damaged: its contents do not match the SHA-256"):
        load_compressed(damaged, DemoClassifier(width=32))


def test_a_checkpoint_without_a_digest_loads_unchecked(checkpoint: Path, tmp_path: Path) -> None:
    """As written before the digest was added: the same model."""
    contents = torch.load(checkpoint, weights_only=True)
    del contents["sha256"]
    older = tmp_path / "older.pt"
    torch.save(contents, older)
    inputs = torch.randn(4, 1, 8, 8)
    expected = load_compressed(checkpoint, DemoClassifier(width=32))(inputs)
    assert torch.equal(load_compressed(older, DemoClassifier(width=32))(inputs), expected)
