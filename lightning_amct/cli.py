"""The ``lightning-amct`` command.

``lightning-amct run RECIPE.yaml`` runs a recipe end to end: float training (or a float
checkpoint), compression training, artifacts and a closing summary.
``lightning-amct plan --cfg CFG --model module:Class`` prints the per-layer plan without training
(a dry run: exit status 2 and a one-line message on a bad config). Every other subcommand
(``fit``, ``validate``, ``test``, ``predict``) is Lightning's own CLI over any LightningModule and
LightningDataModule, to which ``lightning_amct.CompressionCallback`` is added like any callback.

Example:
    $ lightning-amct plan --cfg recipes/quant.cfg --model lightning_amct.demo:DemoNet
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence

import torch

from lightning_amct.config import ConfigError
from lightning_amct.graph import GraphError
from lightning_amct.plan import resolve_plan


def import_object(spec: str) -> object:
    """``package.module:Name`` or ``package.module.Name`` → the object."""
    module_name, sep, attr = spec.partition(":")
    if not sep:
        module_name, _, attr = spec.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"expected module:Name or module.Name, got {spec!r}")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-amct plan",
        description="Print how a retrain config applies to each layer of a model, without training.",
    )
    parser.add_argument("--cfg", required=True, help="the retrain config (.cfg, protobuf text)")
    parser.add_argument("--model", required=True, help="the model class, module:Class (nn.Module or LightningModule)")
    parser.add_argument("--init-args", default="{}", help="JSON object of keyword arguments for the class")
    parser.add_argument(
        "--input-shape",
        help="comma-separated example input shape, e.g. 1,1,8,8 (default: the module's example_input_array)",
    )
    parser.add_argument(
        "--quantize-outputs",
        action="store_true",
        help="also quantize layer outputs that do not go into quantized layers (integer deploy models)",
    )
    return parser


def plan_command(argv: Sequence[str]) -> int:
    """Run ``lightning-amct plan``; returns the exit status."""
    args = _plan_parser().parse_args(argv)
    model = import_object(args.model)(**json.loads(args.init_args))
    example = getattr(model, "example_input_array", None)
    if args.input_shape:
        example = torch.zeros(*(int(d) for d in args.input_shape.split(",")))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = resolve_plan(model, args.cfg, example, quantize_outputs=args.quantize_outputs)
    except (ConfigError, GraphError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(plan)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-amct`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "plan":
        return plan_command(argv[1:])
    if argv and argv[0] == "run":
        from lightning_amct.pipeline import run_command

        return run_command(argv[1:])
    from lightning_amct.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
