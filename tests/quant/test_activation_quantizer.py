"""ActivationQuantizer: calibration, resume, validity restore, fixed_min, shared input, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lightning_amct.quant import ActivationQuantizer, ifmr_clip, ulq_fake_quant, ulq_scale_offset
from lightning_amct.quant.functional.cpu_kernels import fused_cpu_kernels
from lightning_amct.quant.functional.ulq import ulq_grid


def _clips(q: ActivationQuantizer) -> tuple[float, float]:
    return q.clip_max.item(), q.clip_min.item()


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 5, generator=gen) * (1 + i) + 0.3 for i in range(n)]


def test_state_layout() -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=3)
    assert set(dict(q.named_parameters())) == {"clip_max", "clip_min"}
    assert set(q.state_dict()) == {"clip_max", "clip_min", "calibrated_batches", "valid_clip_max", "valid_clip_min"}
    assert q.clip_max.shape == (1,) and q.clip_max.dtype == torch.float32
    assert q.calibrated_batches.dtype == torch.int64 and q.calibrated_batches.item() == 0
    assert q.layer_name == "<unnamed>" and not q.calibrated


@pytest.mark.parametrize("bits", [4, 8])
def test_calibration_counts_training_batches_then_sets_ifmr_clips(bits: int) -> None:
    q = ActivationQuantizer(bits, fixed_min=False, batch_num=3)
    batches = _batches(4)
    q(batches[0])
    assert q.calibrated_batches.item() == 1
    assert _clips(q) == (batches[0].max().item(), batches[0].min().item())
    q.eval()
    q(batches[3])  # eval forwards never count
    assert q.calibrated_batches.item() == 1
    q.train()
    q(batches[1])
    assert _clips(q) == (batches[1].max().item(), batches[1].min().item())
    y = q(batches[2])
    assert q.calibrated and q.calibrated_batches.item() == 3
    expected = ifmr_clip(torch.cat([b.reshape(-1) for b in batches[:3]]), bits)
    assert _clips(q) == (expected[0].item(), expected[1].item())
    assert torch.equal(y, ulq_fake_quant(batches[2], *expected, bits))
    q(batches[3])  # done: the clips no longer move without an optimizer
    assert q.calibrated_batches.item() == 3 and _clips(q) == (expected[0].item(), expected[1].item())


def test_batch_range_is_clamped_to_include_zero() -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=2)
    q(torch.rand(10) + 1.0)
    assert q.clip_min.item() == 0.0 and q.clip_max.item() > 1.0


def test_init_clip_skips_calibration() -> None:
    q = ActivationQuantizer(8, fixed_min=False, init_clip=(2.0, -1.0), batch_num=5)
    assert q.calibrated and q.calibrated_batches.item() == 5
    x = torch.randn(100) * 4
    assert torch.equal(q(x), ulq_fake_quant(x, torch.tensor(2.0), torch.tensor(-1.0), 8))
    assert _clips(q) == (2.0, -1.0)


def test_uncalibrated_quantizer_is_identity_in_eval() -> None:
    q = ActivationQuantizer(8, fixed_min=False).eval()
    x = torch.randn(5)
    assert q(x) is x
    with pytest.raises(RuntimeError, match="never calibrated"):
        q.scale_offset()


def test_no_recalibration_after_loading_a_state_dict() -> None:
    trained = ActivationQuantizer(8, fixed_min=False, batch_num=2)
    for batch in _batches(2):
        trained(batch)
    fresh = ActivationQuantizer(8, fixed_min=False, batch_num=2)
    fresh(torch.randn(7) * 100)  # started calibrating on its own
    fresh.load_state_dict(trained.state_dict())
    assert fresh.calibrated
    x = torch.randn(50) * 30
    assert torch.equal(fresh(x), trained(x))
    assert _clips(fresh) == _clips(trained) and fresh.calibrated_batches.item() == 2


def test_loading_an_uncalibrated_state_restarts_calibration() -> None:
    q = ActivationQuantizer(8, fixed_min=False, init_clip=(1.0, -1.0))
    q.load_state_dict(ActivationQuantizer(8, fixed_min=False).state_dict())
    assert not q.calibrated
    x = torch.randn(30)
    q(x)
    assert q.calibrated and _clips(q) == tuple(v.item() for v in ifmr_clip(x, 8))


@pytest.mark.parametrize(
    ("set_max", "set_min", "expected"),
    [
        (-1.0, 0.5, (2.0, -1.0)),  # crossed: both restored
        (0.5, 0.5, (2.0, -1.0)),  # empty range: both restored (the reference only catches this one)
        (-0.5, -0.75, (2.0, -0.75)),  # negative max: max restored
        (3.0, 0.5, (3.0, -1.0)),  # positive min: min restored
        (3.0, -2.0, (3.0, -2.0)),  # valid: kept
    ],
)
def test_validity_restore(set_max: float, set_min: float, expected: tuple[float, float]) -> None:
    q = ActivationQuantizer(8, fixed_min=False, init_clip=(2.0, -1.0))
    x = torch.linspace(-3, 3, 50)
    q(x)
    with torch.no_grad():
        q.clip_max.fill_(set_max)
        q.clip_min.fill_(set_min)
    assert q.scale_offset() == ulq_scale_offset(torch.tensor([expected[0]]), torch.tensor([expected[1]]), 8)
    y = q(x)
    assert _clips(q) == expected
    assert (q.valid_clip_max.item(), q.valid_clip_min.item()) == expected
    assert torch.equal(y, ulq_fake_quant(x, torch.tensor(expected[0]), torch.tensor(expected[1]), 8))


def test_a_layer_may_quantize_in_its_own_node_after_calibration_in_training_without_hooks() -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=1).train()
    x = torch.linspace(-3, 3, 50)
    assert not q.can_quantize_in_layer(x)  # calibration runs in the module's call
    q(x)
    assert q.can_quantize_in_layer(x)
    calibrated = _clips(q)
    with torch.no_grad():
        q.clip_max.fill_(-1.0)  # invalid: restored before the grid is made
        assert not q.can_quantize_in_layer(x)
    assert q.settled_host_grid() == ulq_grid(*(torch.tensor([c]) for c in calibrated), 8, False, on_host=True)
    assert _clips(q) == calibrated
    assert not q.can_quantize_in_layer(x.double())  # the fused kernels' domain only
    assert not q.eval().can_quantize_in_layer(x)
    handle = q.train().register_forward_pre_hook(lambda module, args: None)
    assert not q.can_quantize_in_layer(x)  # the module's call would run the hook
    handle.remove()
    assert q.can_quantize_in_layer(x)


@pytest.mark.parametrize("fixed_min", [False, True])
def test_settling_on_the_host_equals_the_tensor_path(fixed_min: bool) -> None:
    """The one-kernel settle (check, record, grid) against the tensor operations, clips and valid clips
    included, over valid, crossed, out-of-range, signed-zero and NaN clips."""
    pairs = [(3.0, -2.0), (3.0, 0.0), (3.0, -0.0), (-1.0, 0.5), (0.5, 0.5), (-0.5, -0.75), (3.0, 0.5), (0.0, 0.0)]
    pairs += [(float("nan"), -1.0), (1.0, float("nan")), (1e-9, -1e-9)]
    for clip_max, clip_min in pairs:
        results = []
        for fused in (True, False):
            q = ActivationQuantizer(8, fixed_min=fixed_min, init_clip=(2.0, 0.0 if fixed_min else -1.0)).train()
            with torch.no_grad():
                q.clip_max.fill_(clip_max)
                q.clip_min.fill_(clip_min)
            with fused_cpu_kernels(fused):
                grid = q.settled_host_grid()
            state = [q.clip_max, q.clip_min, q.valid_clip_max, q.valid_clip_min]
            results.append(torch.cat([*(t.detach() for t in state), torch.tensor(grid)]))
        torch.testing.assert_close(*results, rtol=0, atol=0, equal_nan=True, msg=f"clips {clip_max}, {clip_min}")
        assert torch.equal(results[0].signbit(), results[1].signbit())


def test_valid_clips_follow_the_clips_also_after_a_state_dict_load() -> None:
    q = ActivationQuantizer(8, fixed_min=True, init_clip=(2.0, 0.0)).train()
    x = torch.rand(10)
    q(x)
    with torch.no_grad():
        q.clip_max.fill_(3.0)
    q(x)
    assert (q.valid_clip_max.item(), q.valid_clip_min.item()) == (3.0, 0.0)
    state = q.state_dict()
    state["valid_clip_max"] = torch.tensor([5.0])  # a checkpoint written before the last step
    q.load_state_dict(state)
    q(x)
    assert (q.valid_clip_max.item(), q.valid_clip_min.item()) == (3.0, 0.0)


def test_fixed_min_zeroes_clip_min_every_forward() -> None:
    q = ActivationQuantizer(4, fixed_min=True, batch_num=2)
    for batch in _batches(2):
        q(batch)
        assert q.clip_min.item() == 0.0
    with torch.no_grad():
        q.clip_min.fill_(-0.7)  # e.g. after an optimizer step
    x = torch.randn(20).relu()
    y = q(x)
    assert q.clip_min.item() == 0.0
    assert torch.equal(y, ulq_fake_quant(x, q.clip_max.detach(), torch.zeros(1), 4))


@pytest.mark.parametrize("fixed_min", [False, True])
def test_gradients_reach_the_clips(fixed_min: bool) -> None:
    q = ActivationQuantizer(8, fixed_min=fixed_min, init_clip=(1.0, -1.0))
    x = (torch.randn(40) * 2).requires_grad_(True)
    q(x).pow(2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    lower = 0.0 if fixed_min else -1.0
    cmax, cmin = torch.tensor([1.0], requires_grad=True), torch.tensor([lower], requires_grad=True)
    ulq_fake_quant(xr, cmax, cmin, 8).pow(2).sum().backward()
    assert torch.equal(q.clip_max.grad, cmax.grad)
    if fixed_min:  # pinned to 0, never learned: no gradient for an optimizer to apply
        assert not q.clip_min.requires_grad and q.clip_min.grad is None
    else:
        assert torch.equal(q.clip_min.grad, cmin.grad)
    assert torch.equal(x.grad, xr.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_calibration_on_other_dtypes(dtype: torch.dtype) -> None:
    q = ActivationQuantizer(8, fixed_min=False)
    x = torch.randn(300).to(dtype)
    assert q(x).dtype == dtype
    assert _clips(q) == tuple(v.item() for v in ifmr_clip(x.float(), 8))
    assert q.clip_max.dtype == torch.float32


def test_force_fp16_scale() -> None:
    q = ActivationQuantizer(8, fixed_min=False, init_clip=(1.0, -0.3), force_fp16=True)
    scale, offset = q.scale_offset()
    assert (scale, offset) == ulq_scale_offset(torch.tensor([1.0]), torch.tensor([-0.3]), 8, force_fp16=True)
    assert scale.item() == float(torch.tensor(1.3 / 255).half())
    x = torch.randn(64)
    assert torch.equal(q(x), ulq_fake_quant(x, torch.tensor(1.0), torch.tensor(-0.3), 8, force_fp16=True))


def test_shared_input_is_computed_once_and_counted_once() -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=2)
    x = torch.randn(3, 4, requires_grad=True)
    y1 = q(x)
    y2 = q(x)  # a second layer reading the same tensor
    assert y2 is y1 and q.calibrated_batches.item() == 1
    other = q(x.detach().clone())  # a new batch
    assert other is not y1 and q.calibrated_batches.item() == 2


def test_shared_input_cache_is_invalidated() -> None:
    q = ActivationQuantizer(8, fixed_min=False, init_clip=(1.0, -1.0))
    x = torch.randn(10)
    y = q(x)
    x.mul_(2)  # changed in place between the two readers
    assert q(x) is not y
    y = q(x)
    with torch.no_grad():
        q.clip_max.add_(0.5)  # an optimizer step
    assert q(x) is not y
    y = q(x)
    q.eval()
    assert q(x) is not y
    with torch.inference_mode():
        xi = torch.randn(10)
        assert q(xi) is not q(xi)  # inference tensors are not cached, but give equal results
        assert torch.equal(q(xi), q(xi))


def test_cached_output_that_died_is_recomputed_without_counting() -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=3)
    x = torch.randn(10)
    first = q(x).clone()
    assert torch.equal(q(x), first)  # the first output was dropped: recomputed, not recounted
    assert q.calibrated_batches.item() == 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_during_calibration_name_the_layer(bad: float) -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=2)
    q.layer_name = "backbone.conv3"
    x = torch.randn(10)
    x[4] = bad
    with pytest.raises(ValueError, match=r"backbone\.conv3.*non-finite"):
        q(x)
    assert q.calibrated_batches.item() == 0


def test_empty_input_during_calibration_names_the_layer() -> None:
    q = ActivationQuantizer(8, fixed_min=False)
    q.layer_name = "head"
    with pytest.raises(ValueError, match="head"):
        q(torch.zeros(0, 3))


def test_copy_and_pickle_after_forward() -> None:
    q = ActivationQuantizer(8, fixed_min=False, batch_num=2)
    q(torch.randn(6))
    twin = copy.deepcopy(q)
    x = torch.randn(6)
    assert torch.equal(twin(x), q(x))
    buffer = io.BytesIO()
    torch.save(q, buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=False).calibrated


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_bits": 3.5}, "num_bits"),
        ({"batch_num": 0}, "batch_num"),
        ({"init_clip": (-1.0, -2.0)}, "init_clip"),
        ({"init_clip": (1.0, 2.0)}, "init_clip"),
        ({"init_clip": (float("nan"), 0.0)}, "init_clip"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ActivationQuantizer(**{"num_bits": 8, "fixed_min": False, **kwargs})


def test_a_training_quantizer_runs_under_inference_mode() -> None:
    """Under ``torch.inference_mode`` (no gradients, tensors without version counters) a quantizer
    in training mode quantizes as under ``no_grad``: it keeps no codes, which serve a backward only."""
    q = ActivationQuantizer(8, fixed_min=False, batch_num=1)
    q(_batches(1)[0])  # calibration
    x = _batches(2, seed=1)[1]
    with torch.no_grad():
        expected = q(x.clone())  # a tensor of its own: the quantizer answers a repeated input from a cache
    with torch.inference_mode():
        assert torch.equal(q(x), expected)
