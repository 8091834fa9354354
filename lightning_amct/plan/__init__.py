"""The per-layer plan: what each layer of a model gets from a config, decided before training."""

from lightning_amct.plan.layers import FILTER_PRUNABLE_TYPES, QUANTIZABLE_TYPES
from lightning_amct.plan.resolve import resolve_plan
from lightning_amct.plan.specs import CompressionPlan, LayerPlan, OutputSpec, PruneSpec, QuantSpec

__all__ = [
    "FILTER_PRUNABLE_TYPES",
    "QUANTIZABLE_TYPES",
    "CompressionPlan",
    "LayerPlan",
    "OutputSpec",
    "PruneSpec",
    "QuantSpec",
    "resolve_plan",
]
