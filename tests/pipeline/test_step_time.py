"""Training steps of two models timed in turns, outside their Trainers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from lightning_amct import compress_model
from lightning_amct.demo import DemoClassifier, DigitsDataModule
from lightning_amct.pipeline import load_recipe
from lightning_amct.pipeline.runner import _steps_in_turns
from lightning_amct.pipeline.step_time import StepTimingError, paired_step_seconds, step_clock


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    data = DigitsDataModule(batch_size=16)
    data.setup("fit")
    return next(iter(data.train_dataloader()))


class _Scheduled(DemoClassifier):
    """Optimizers and schedulers as two lists, and a training step that returns a dict."""

    def configure_optimizers(self) -> tuple[list, list]:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return [optimizer], [torch.optim.lr_scheduler.StepLR(optimizer, 1)]

    def training_step(self, batch: tuple, batch_idx: int) -> dict:
        return {"loss": super().training_step(batch, batch_idx)}


class _Manual(DemoClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class _NeedsTrainer(DemoClassifier):
    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * (1 + self.trainer.global_step)


class _SchedulerNeedsTrainer(DemoClassifier):
    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        steps = self.trainer.estimated_stepping_batches
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, steps)}


class _CountsThreads(DemoClassifier):
    """Records torch's thread count in its step."""

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        self.threads = torch.get_num_threads()
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("threads", [1, 2, 0])
def test_the_steps_run_on_the_threads_asked_for_and_leave_torch_s_count_as_it_was(batch: tuple, threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        module = _CountsThreads()
        seconds = paired_step_seconds({"float": module}, batch, warmup=1, repeats=2, threads=threads)
        assert module.threads == (threads or 3) and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(previous)
    assert seconds["float"] > 0


def test_one_thread_is_timed_by_its_cpu_time_more_by_wall_time() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert step_clock(cpu, 1) == (time.thread_time, "CPU time of the computing thread, 1 torch thread")
    assert step_clock(cpu, 0) == (time.perf_counter, "wall time, default torch thread(s)")
    assert step_clock(cpu, 4) == (time.perf_counter, "wall time, 4 torch thread(s)")
    assert step_clock(gpu, 1) == (time.perf_counter, "wall time on cuda")


def test_both_models_train_in_turns_and_get_a_median(batch: tuple) -> None:
    torch.manual_seed(0)
    float_model, quantized = DemoClassifier(), DemoClassifier()
    quantized.load_state_dict(float_model.state_dict())
    compress_model(quantized.net, "retrain_data_quant_config { ulq_quantize { } }", batch[0][:1])
    before = {name: p.detach().clone() for name, p in quantized.named_parameters()}

    seconds = paired_step_seconds({"float": float_model, "int8": quantized}, batch, warmup=1, repeats=4)

    assert set(seconds) == {"float", "int8"} and all(0 < s < 5 for s in seconds.values())
    after = dict(quantized.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)  # the steps trained it
    assert quantized.training


def test_optimizers_in_lists_with_schedulers_and_a_loss_in_a_dict(batch: tuple) -> None:
    seconds = paired_step_seconds({"scheduled": _Scheduled()}, batch, warmup=0, repeats=2)
    assert seconds["scheduled"] > 0


@pytest.mark.parametrize(
    ("module", "reason"),
    [
        (_Manual(), "_Manual uses manual optimization"),
        (_NeedsTrainer(), "_NeedsTrainer cannot train outside its Trainer: RuntimeError"),
        (_SchedulerNeedsTrainer(), "_SchedulerNeedsTrainer cannot train outside its Trainer: RuntimeError"),
    ],
)
def test_a_model_that_cannot_step_outside_its_trainer_says_why(
    batch: tuple, module: DemoClassifier, reason: str
) -> None:
    with pytest.raises(StepTimingError, match=reason):
        paired_step_seconds({"float": DemoClassifier(), "other": module}, batch, warmup=0, repeats=1)


def test_a_run_whose_model_cannot_step_in_turns_falls_back_to_the_stages_and_says_so(tmp_path: Path) -> None:
    recipe = load_recipe("recipes/quant.yaml")
    checkpoint = tmp_path / "float.ckpt"
    torch.save({"state_dict": DemoClassifier().state_dict()}, checkpoint)
    data = DigitsDataModule(batch_size=16)
    data.setup("fit")

    timed = _steps_in_turns(recipe, DemoClassifier(), data, checkpoint)
    assert timed.seconds.keys() == {"float", "compressed"} and timed.remark is None
    assert timed.clock == "CPU time of the computing thread, 1 torch thread"
    seconds, clock, remark = _steps_in_turns(recipe, _Manual(), data, checkpoint)
    assert seconds is None and clock is None
    assert remark == (
        "train step: each stage's own median, timed minutes apart (no steps in turns: "
        "_Manual uses manual optimization)."
    )

    narrow = tmp_path / "narrow.ckpt"  # weights of another model than the recipe builds
    torch.save({"state_dict": DemoClassifier(width=16).state_dict()}, narrow)
    seconds, _, remark = _steps_in_turns(recipe, DemoClassifier(), data, narrow)
    assert seconds is None
    assert remark.startswith(
        "train step: each stage's own median, timed minutes apart (no steps in turns: the float model could not "
        "be built again: RuntimeError: Error(s) in loading state_dict for DemoClassifier"
    )
