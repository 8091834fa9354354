"""FSDP2: real 2-process runs of ``ModelParallelStrategy`` with ``fully_shard`` (gloo, CPU).

``fsdp2_script.py`` runs once for the whole module (Lightning starts its second process): for
INT8 with learned weight scales and 4:2 sparsity (distributed checkpoints), and for INT8 with
channel pruning and output quantizers (full checkpoints), a straight run of two epochs and a
run resumed from the first epoch's checkpoint into a fresh module with another seed.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_amct.demo import DemoClassifier, digits_tensors
from lightning_amct.export import load_compressed
from lightning_amct.modules.apply import CompressionState, apply_plan

SCRIPT = Path(__file__).with_name("fsdp2_script.py")
CONFIGS = ["selective", "filter"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp2")
    done = subprocess.run([sys.executable, str(SCRIPT), str(out)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("run", ["straight", "resumed"])
def test_ranks_agree_on_sharded_clips_scales_masks_and_channels(name: str, run: str, runs: Path) -> None:
    rank0, rank1 = (_load(runs / f"{name}-{run}-rank{rank}.pt") for rank in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0["sharded"] and rank1["sharded"]
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]) if isinstance(value, torch.Tensor) else value == rank1[key], key
    # What the quantizers wrote in their forwards reached the shards: IFMR set every clip (from
    # 0), the learned weight scales started from the ARQ rule (about 0.01 here, not 1).
    clips = {key: value for key, value in rank0.items() if key.endswith(".clip_max")}
    assert clips and all(float(value) > 0.1 for value in clips.values()), clips
    assert all(int(value) == 2 for key, value in rank0.items() if key.endswith("calibrated_batches"))
    scales = [value for key, value in rank0.items() if key.endswith(".scale")]
    assert bool(scales) == (name == "selective") and all(float(s.abs().max()) < 0.1 for s in scales)
    masks = [value for key, value in rank0.items() if key.endswith("weight_mask")]
    assert bool(masks) == (name == "selective")
    assert all(float(mask.mean()) in (0.5, 1.0) for mask in masks) and any(float(mask.mean()) == 0.5 for mask in masks) == bool(masks)
    # the schedule counted every batch of the two epochs (it counted none under FSDP2's unsharded weights)
    assert all(int(value) == 8 for key, value in rank0.items() if key.endswith("mask_batches"))
    assert bool(rank0["kept"]) == (name == "filter")
    assert any(".output_quant." in key for key in rank0) == (name == "filter")


@pytest.mark.parametrize("name", CONFIGS)
def test_checkpoints_resume_the_exact_state(name: str, runs: Path) -> None:
    """Distributed (``selective``) and full (``filter``) checkpoints: the fresh module resumes with
    the state of the end of the first epoch, structure and all, then trains on.

    FSDP2 shards parameters, not buffers: each rank keeps the BatchNorm statistics of its own
    batches, as in float training, and a distributed checkpoint stores one rank's (not
    necessarily rank zero's). The compression buffers (clips, masks, counters) agree on all ranks.
    """
    saved, restored = _load(runs / f"{name}-straight-epoch0.pt"), _load(runs / f"{name}-resumed-start.pt")
    assert saved.keys() == restored.keys()
    for key in saved:
        if name == "selective" and key.endswith((".running_mean", ".running_var")):
            continue  # one rank's statistics, per the docstring
        assert torch.equal(saved[key], restored[key]), key
    assert _load(runs / f"{name}-resumed-rank0.pt")["kept"] == _load(runs / f"{name}-straight-rank0.pt")["kept"]
    trained = _load(runs / f"{name}-resumed-epoch1.pt")
    assert not torch.equal(trained["net.fc.weight"], restored["net.fc.weight"])
    # the first config's checkpoints are distributed: a directory of shards
    assert (runs / f"{name}-checkpoints" / "epoch=0.ckpt").is_dir() == (name == "selective")


@pytest.mark.parametrize("name", CONFIGS)
def test_artifacts_come_from_the_whole_trained_model(name: str, runs: Path) -> None:
    paths = {key: Path(value) for key, value in _load(runs / f"{name}-straight-artifacts.pt").items()}
    assert len(paths) == 6 and all(path.is_file() for path in paths.values())
    # The model as it trained: the full state at the end, in the structure the record describes.
    reference = DemoClassifier(width=16)
    state = CompressionState.from_record(_load(paths["checkpoint"])["compression"])
    apply_plan(reference, state.plan, reference.example_input_array, state.kept_channels)
    reference.load_state_dict(_load(runs / f"{name}-straight-epoch1.pt"))
    loaded = load_compressed(paths["checkpoint"], DemoClassifier(width=16))
    images = digits_tensors()["test"].tensors[0][:64]
    with torch.no_grad():
        expected, actual = reference.eval()(images), loaded(images)
    # within one quantization step of the head's output (rounding may flip a step where float decides)
    head = loaded.net.fc
    step = float(head.act_quant.scale) * float(head.weight.abs().sum(dim=1).max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=step + 1e-4)
    assert (expected.argmax(1) == actual.argmax(1)).float().mean() > 0.9
