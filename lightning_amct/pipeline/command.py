"""``lightning-amct run RECIPE``: run a recipe from the shell and print its summary.

Options shrink or redirect the run without editing the recipe: ``--epochs`` and
``--limit-batches`` for a quick look, ``--float-ckpt`` to reuse a float model trained before,
``--output-dir`` to keep runs apart. A recipe or config error, or a model whose graph cannot be
traced for the plan, prints one line and exits with status 2 before anything trains.

Example:
    $ lightning-amct run recipes/quant.yaml --fast --output-dir runs/smoke
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning_amct.config import ConfigError
from lightning_amct.graph import GraphError
from lightning_amct.pipeline.recipe import RecipeError, load_recipe

FAST_EPOCHS = 1
FAST_BATCHES = 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-amct run",
        description="Train the float model, compress it, export the artifacts and print float vs compressed.",
    )
    parser.add_argument("recipe", help="the recipe, a YAML file (see recipes/quant.yaml)")
    parser.add_argument("--output-dir", help="where the results go (default: the recipe's output_dir)")
    parser.add_argument("--float-ckpt", help="start from this float Lightning checkpoint instead of training one")
    parser.add_argument("--epochs", type=int, help="epochs of each stage")
    parser.add_argument("--limit-batches", type=int, help="train, validation and test batches per epoch")
    parser.add_argument(
        "--fast",
        action="store_true",
        help=f"a smoke run: --epochs {FAST_EPOCHS} --limit-batches {FAST_BATCHES} unless given",
    )
    return parser


def run_command(argv: Sequence[str]) -> int:
    """Run ``lightning-amct run``; returns the exit status."""
    args = _parser().parse_args(argv)
    epochs, limit_batches = args.epochs, args.limit_batches
    if args.fast:
        epochs = FAST_EPOCHS if epochs is None else epochs
        limit_batches = FAST_BATCHES if limit_batches is None else limit_batches
    try:
        recipe = load_recipe(args.recipe).with_budget(epochs, limit_batches, args.output_dir, args.float_ckpt)
        from lightning_amct.pipeline.runner import run_recipe  # Lightning: only once the recipe is valid

        result = run_recipe(recipe)
    except (RecipeError, ConfigError, GraphError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the disk, not the recipe (an artifact that cannot be written, a full disk)
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if result is None:  # another rank of a multi-process run: rank 0 prints the summary
        return 0
    print(f"\n{result.summary().to_markdown()}\n")
    print(f"results in {recipe.output_dir}: summary.md, {len(result.artifacts)} files")
    return 0
