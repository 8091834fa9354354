"""Shared test helpers: the repository's recipes and a quiet, fast Lightning Trainer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_amct.quant.functional.cpu_kernels import fused_cpu_kernels
from lightning_amct.quant.functional.library import NAMESPACE

RECIPES = Path(__file__).parents[1] / "recipes"


def make_trainer(root: Path, **kwargs: Any) -> pl.Trainer:
    """A CPU Trainer without progress bar or model summary, logging under ``root``."""
    defaults: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "logger": False,
        "enable_checkpointing": False,
        "num_sanity_val_steps": 0,
        "deterministic": True,
    }
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


@pytest.fixture
def recipes() -> Path:
    return RECIPES


@pytest.fixture
def trainer_factory(tmp_path: Path):
    """``trainer_factory(**kwargs)``: :func:`make_trainer` rooted in the test's ``tmp_path``."""
    return lambda **kwargs: make_trainer(tmp_path, **kwargs)


@pytest.fixture(params=["fused", "tensor-ops"])
def kernel_path(request: pytest.FixtureRequest) -> Any:
    """Run the test once with the fused CPU kernels and once with the tensor-op path (CUDA's)."""
    with fused_cpu_kernels(request.param == "fused"):
        yield request.param


@pytest.fixture
def compiled_quantizers() -> Callable[[torch.fx.GraphModule], Counter[str]]:
    """What ``torch.compile`` captured of the quantizers in a graph, its subgraphs (a checkpointed
    region) included: the calls of each ``torch.ops.lightning_amct`` operator by name, and the
    autograd Functions traced whole as ``"autograd Function"``."""

    def count(graph_module: torch.fx.GraphModule) -> Counter[str]:
        graphs = [module.graph for module in graph_module.modules() if isinstance(module, torch.fx.GraphModule)]
        targets = [node.target for graph in graphs for node in graph.nodes if node.op == "call_function"]
        # an operator's target reads "lightning_amct.<name>.default"
        names = [str(target).split(".")[1] for target in targets if str(target).startswith(f"{NAMESPACE}.")]
        functions = sum(getattr(target, "__name__", "") == "autograd_function_apply" for target in targets)
        return Counter(names) + Counter({"autograd Function": functions})

    return count
