"""The float and the compressed model's training steps, timed in turns on one training batch.

Each stage of a run times the steps it trains, but the two stages run minutes apart, after
different histories of allocation: on Linux, glibc gives a large freed tensor back to the system
and maps it again (page faults over the whole tensor) at every step in one stage and not in the
other, and the machine's load changes in between. Over runs of ``recipes/quant.yaml`` on two idle
cores, the ratio of the two stages' median steps ranged from 0.79x to 1.42x, while the same
models stepping in turns measured 1.20x (``bench/run_all.py``). So the summary times both models
once training is over, a step of each in turn on the same batch
(:func:`~lightning_amct.pipeline.measure.medians_in_turns`, as ONNX Runtime's latency), warm-up
steps first, and compares the medians: on the CPU, by default, on one torch thread timed by its
CPU time, as ONNX Runtime's latency (the recipe's ``evaluate.latency_threads`` sets both).

A step is what the Trainer does with automatic optimization: ``zero_grad``, ``training_step``,
``backward`` on its loss, the optimizer's ``step`` (the first optimizer that
``configure_optimizers`` returns; no scheduler). It runs outside any Trainer, so ``self.log``
records nothing (Lightning warns and returns). A module that cannot step that way (manual
optimization, a ``training_step`` that needs its Trainer or returns no loss) is not timed:
:func:`paired_step_seconds` raises :class:`StepTimingError`, and the summary falls back to the
stages' own medians, saying so.

Example:
    >>> from lightning_amct.demo import DemoClassifier, DigitsDataModule
    >>> data = DigitsDataModule(batch_size=32)
    >>> data.setup("fit")
    >>> batch = next(iter(data.train_dataloader()))
    >>> seconds = paired_step_seconds({"a": DemoClassifier(), "b": DemoClassifier()}, batch, warmup=1, repeats=3)
    >>> sorted(seconds), all(s > 0 for s in seconds.values())
    (['a', 'b'], True)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_amct.pipeline.measure import medians_in_turns
from lightning_amct.pipeline.stages import synchronize

#: Untimed steps of each model before the timed ones (first-call costs, lazy allocations).
WARMUP_STEPS = 3
#: Timed steps of each model; the summary shows their median.
TIMED_STEPS = 20


class StepTimingError(RuntimeError):
    """A model that cannot take a training step outside its Trainer (the message says why)."""


def paired_step_seconds(
    models: Mapping[str, pl.LightningModule],
    batch: Any,
    warmup: int = WARMUP_STEPS,
    repeats: int = TIMED_STEPS,
    threads: int = 1,
) -> dict[str, float]:
    """Median seconds of one training step of each model, the models taking turns step by step.

    The models train on ``batch`` (moved to each model's device) in training mode, and their
    weights change: pass models whose weights are no longer needed, or copies.

    On the CPU the steps run on ``threads`` torch threads (0: as many as torch has now). One
    thread, the default, is timed by its CPU time, as ONNX Runtime's latency is
    (:mod:`~lightning_amct.pipeline.measure`): other work on the machine hardly changes it,
    where the wall time of a step on two threads of two busy cores measured 8x its idle time (a
    thread of the team waits for the other at every operator). More threads, and models on
    another device, are timed by wall time.

    Raises:
        StepTimingError: a model uses manual optimization, has no optimizer, or its
            ``training_step`` fails outside a Trainer or gives no loss.
    """
    devices = {module.device for module in models.values()}
    # models on the CPU and on an accelerator: timed as the accelerator's
    device = next((d for d in devices if d.type != "cpu"), torch.device("cpu"))
    clock, _ = step_clock(device, threads)
    with ExitStack() as detached:
        for module in models.values():
            detached.enter_context(_without_trainer(module))
        if device.type == "cpu" and threads:
            detached.enter_context(_torch_threads(threads))
        steps = {name: _training_step(module, batch) for name, module in models.items()}
        return medians_in_turns(steps, warmup, repeats, clock)


def step_clock(device: torch.device, threads: int) -> tuple[Callable[[], float], str]:
    """The clock that :func:`paired_step_seconds` times steps on ``device`` with, and its name for the summary."""
    if device.type != "cpu":
        return time.perf_counter, f"wall time on {device.type}"
    if threads == 1:
        return time.thread_time, "CPU time of the computing thread, 1 torch thread"
    return time.perf_counter, f"wall time, {threads or 'default'} torch thread(s)"


@contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU operators on ``threads`` threads inside the block."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _training_step(module: pl.LightningModule, batch: Any) -> Callable[[], None]:
    """One automatic-optimization step of ``module`` (detached from its Trainer) on ``batch``, as a
    function, after a first step here: a module that cannot train outside its Trainer fails before
    any timing."""
    name = type(module).__name__
    if not module.automatic_optimization:
        raise StepTimingError(f"{name} uses manual optimization")
    try:
        optimizer = _first_optimizer(module.configure_optimizers())
        if optimizer is None:
            raise StepTimingError(f"{name}.configure_optimizers returned no optimizer")
        batch = module.transfer_batch_to_device(batch, module.device, 0)
        module.train()

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            output = module.training_step(batch, 0)
            loss = output.get("loss") if isinstance(output, Mapping) else output
            if not isinstance(loss, torch.Tensor):
                raise StepTimingError(f"{name}.training_step returned no loss outside its Trainer")
            loss.backward()
            optimizer.step()
            synchronize(module)

        step()
    except StepTimingError:
        raise
    except Exception as error:  # whatever the user's code raises without its Trainer
        raise StepTimingError(f"{name} cannot train outside its Trainer: {type(error).__name__}: {error}") from error
    return step


@contextmanager
def _without_trainer(module: pl.LightningModule) -> Iterator[None]:
    """``module`` detached from its Trainer (whose loops are over), Lightning's warnings about it silenced."""
    trainer = module._trainer
    module._trainer = None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*self\.log.*")
            yield
    finally:
        module._trainer = trainer


def _first_optimizer(configured: Any) -> torch.optim.Optimizer | None:
    """The first optimizer in what ``configure_optimizers`` returned, in any of Lightning's forms
    (an optimizer, a list or tuple of them, a pair of lists with schedulers, a dict or list of dicts)."""
    if isinstance(configured, torch.optim.Optimizer):
        return configured
    if isinstance(configured, Mapping):
        return _first_optimizer(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)) and configured:
        return _first_optimizer(configured[0])
    return None
