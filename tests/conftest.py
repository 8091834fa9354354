"""Shared test helpers: the repository's recipes and a quiet, fast Lightning Trainer."""

from __future__ import annotations

import copy
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


class Levit:
    """A small LeViT image classifier (3x32x32, 3 classes), in training mode: its attention keeps
    its biases in a cache in eval mode and empties the cache only in its own ``train()``."""

    def __init__(self) -> None:
        from transformers import LevitConfig, LevitForImageClassification

        config = LevitConfig(
            image_size=32, hidden_sizes=[16, 32], num_attention_heads=[1, 2], depths=[1, 1], key_dim=[8, 8],
            mlp_ratio=[2, 2], attention_ratio=[2, 2], down_ops=[["Subsample", 8, 2, 4, 2, 2]], num_labels=3,
        )
        torch.manual_seed(0)
        self.model = LevitForImageClassification(config).train()
        self.inputs = torch.randn(2, 3, 32, 32)
        # torch's initialisation and BatchNorm statistics of the inputs: with transformers' N(0, 0.02)
        # the activations vanish in eval mode, and every output is the same
        for module in self.model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.reset_parameters()
            elif isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.momentum = None
        with torch.no_grad():
            self.model(self.inputs)

    def caches(self, model: torch.nn.Module | None = None) -> list[dict]:
        """The attention-bias caches of ``model`` (default: :attr:`model`)."""
        return [m.attention_bias_cache for m in (model or self.model).modules() if hasattr(m, "attention_bias_cache")]

    @torch.no_grad()
    def train_biases(self) -> None:
        """Change the attention biases, as training would."""
        for module in self.model.modules():
            if hasattr(module, "attention_biases"):
                module.attention_biases.add_(torch.randn_like(module.attention_biases))  # softmax ignores a constant

    @staticmethod
    def emptied(model: torch.nn.Module) -> torch.nn.Module:
        """A copy of ``model`` in training mode with its caches emptied (by LeViT's own ``train()``)."""
        return copy.deepcopy(model).train()


@pytest.fixture
def levit() -> Levit:
    return Levit()


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
