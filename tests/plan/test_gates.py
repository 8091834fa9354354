"""Gate sites: which modules' gate values go on the fixed grid (not a hard swish's), planned with ``quantize_outputs`` only,
kept in the plan's record and shown in its table."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lightning_amct import resolve_plan
from lightning_amct.plan import CompressionPlan
from lightning_amct.plan.compare import plan_differences

INT8 = "retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }"


class _OwnSigmoid(nn.Sigmoid):
    """A subclass with a ``forward`` of its own: it may compute anything."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(2 * x)


class _PlainSiLU(nn.SiLU):
    """A subclass that keeps ``nn.SiLU.forward``: a gate like its class."""


class _Gates(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.silu, self.plain_silu = nn.Conv2d(3, 8, 1), nn.SiLU(), _PlainSiLU()
        self.conv2, self.swish, self.in_place = nn.Conv2d(8, 8, 1), nn.Hardswish(), nn.SiLU(inplace=True)
        self.se, self.gate, self.hard_gate, self.own = nn.Conv2d(8, 8, 1), nn.Sigmoid(), nn.Hardsigmoid(), _OwnSigmoid()
        self.unused, self.head, self.out = nn.Sigmoid(), nn.Conv2d(8, 2, 1), nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_place(self.swish(self.conv2(self.plain_silu(self.silu(self.conv1(x))))))
        x = x * self.gate(self.se(x)) * self.hard_gate(x) * self.own(x)
        return self.out(self.head(x))  # the model's output: stays float


def test_gate_sites_are_the_sigmoid_type_modules_with_their_own_forward() -> None:
    plan = resolve_plan(_Gates(), INT8, torch.zeros(1, 3, 4, 4), quantize_outputs=True)
    assert plan.gates == {"silu": "silu", "plain_silu": "silu", "gate": "sigmoid", "hard_gate": "hardsigmoid"}
    assert "gate" not in plan.outputs and "hard_gate" not in plan.outputs  # on the gate grid already
    assert CompressionPlan.from_dict(plan.to_dict()) == plan
    table = str(plan)
    assert "4 gate(s) on the fixed INT8 grid of [0, 1]" in table and "  plain_silu: x * Q(sigmoid(x))" in table
    # without quantize_outputs the deploy model is not integer: no gates
    assert resolve_plan(_Gates(), INT8, torch.zeros(1, 3, 4, 4)).gates == {}
    # a checkpoint trained without gates is another structure
    differences = plan_differences(dataclasses.replace(plan, gates={"gate": "sigmoid"}), plan)
    assert differences[0] == "gate silu: none in the checkpoint, silu here" and len(differences) == 3
