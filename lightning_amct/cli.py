"""The ``lightning-amct`` command.

``lightning-amct run RECIPE.yaml`` runs a recipe end to end: float training (or a float
checkpoint), compression training, artifacts and a closing summary.
``lightning-amct plan --cfg CFG --model module:Class`` prints the per-layer plan without training
(a dry run: exit status 2 and a one-line message on a bad config or a model it cannot build).
Every other subcommand (``fit``, ``validate``, ``test``, ``predict``) is Lightning's own CLI over
any LightningModule and LightningDataModule, to which ``lightning_amct.CompressionCallback`` is
added like any callback. Lightning is imported only for the subcommands that train, so ``--help``
and ``plan`` with a plain ``nn.Module`` answer in about the time it takes to import torch.

Example:
    $ lightning-amct plan --cfg recipes/quant.cfg --model lightning_amct.demo.DemoClassifier
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

#: Every subcommand, with the line ``lightning-amct --help`` shows for it.
SUBCOMMANDS = {
    "run": "the main job: train float, compress, export, compare",
    "plan": "what a retrain config does to each layer, without training",
    "fit": "Lightning's fit; add lightning_amct.CompressionCallback",
    "validate": "Lightning's validate (compressed checkpoints too)",
    "test": "Lightning's test (compressed checkpoints too)",
    "predict": "Lightning's predict (compressed checkpoints too)",
}
_LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-amct",
        description="Model compression for PyTorch Lightning, driven by the AMCT retrain config.",
        epilog="'lightning-amct SUBCOMMAND --help' shows the options of each.",
    )
    subcommands = parser.add_subparsers(title="subcommands", metavar="SUBCOMMAND")
    for name, line in SUBCOMMANDS.items():
        subcommands.add_parser(name, help=line)
    return parser


def _sentence(line: str) -> str:
    """A subcommand's help line as the first sentence of its own ``--help``: capitalised, with a full stop."""
    return f"{line[:1].upper()}{line[1:]}."


#: What ``plan --input-dtype`` offers: image, audio and feature inputs, and token ids.
INPUT_DTYPES = ("float32", "float64", "bfloat16", "float16", "int64", "int32")


def _plan_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-amct plan", description=_sentence(SUBCOMMANDS["plan"]))
    parser.add_argument("--cfg", required=True, help="the retrain config (.cfg, protobuf text)")
    parser.add_argument(
        "--model",
        required=True,
        help="the model class, package.module.Class or package.module:Class (nn.Module or LightningModule)",
    )
    parser.add_argument("--init-args", default="{}", help="JSON object of keyword arguments for the class")
    parser.add_argument(
        "--input-shape",
        help="comma-separated example input shape, e.g. 1,1,8,8 (default: the module's example_input_array)",
    )
    parser.add_argument(
        "--input-dtype",
        default="float32",
        choices=INPUT_DTYPES,
        help="dtype of the --input-shape input: int64 for token ids (zeros), float32 by default",
    )
    parser.add_argument(
        "--quantize-outputs",
        action="store_true",
        help="also quantize layer outputs that do not go into quantized layers (integer deploy models)",
    )
    return parser


class _UsageError(ValueError):
    """An argument of ``plan`` that names nothing usable; the message is the one line to print."""


def _build_model(args: argparse.Namespace) -> tuple[object, object]:
    """The model ``--model`` names, built with ``--init-args``, and its example input."""
    import torch

    from lightning_amct.class_path import ClassPathError, build, import_object

    try:
        init_args = json.loads(args.init_args)
    except json.JSONDecodeError as exc:
        raise _UsageError(f"--init-args: not a JSON object: {exc}") from exc
    if not isinstance(init_args, dict):
        raise _UsageError(f"--init-args: expected a JSON object, got {args.init_args}")
    try:
        cls = import_object(args.model)
    except ClassPathError as exc:
        raise _UsageError(f"--model: {exc}") from exc
    if not isinstance(cls, type) or not issubclass(cls, torch.nn.Module):
        raise _UsageError(f"--model: {args.model} is not an nn.Module class")
    try:
        model = build(cls, init_args)
    except ClassPathError as exc:
        raise _UsageError(f"--init-args: {exc}") from exc
    example = getattr(model, "example_input_array", None)
    if args.input_shape:
        try:
            shape = [int(d) for d in args.input_shape.split(",")]
            example = torch.zeros(*shape, dtype=getattr(torch, args.input_dtype))
        except ValueError as exc:
            message = f"expected comma-separated sizes such as 1,3,32,32, got {args.input_shape!r}"
            raise _UsageError(f"--input-shape: {message}") from exc
    return model, example


def plan_command(argv: Sequence[str]) -> int:
    """Run ``lightning-amct plan``; returns the exit status."""
    from lightning_amct.config import ConfigError
    from lightning_amct.graph import GraphError
    from lightning_amct.plan import resolve_plan

    args = _plan_parser().parse_args(argv)
    try:
        model, example = _build_model(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = resolve_plan(model, args.cfg, example, quantize_outputs=args.quantize_outputs)
    except (_UsageError, ConfigError, GraphError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for warning in caught:
        message = _in_command_words(str(warning.message))
        token_ids = "Expected tensor for argument #1 'indices'" in message  # an embedding given floats
        if token_ids and args.input_shape and args.input_dtype == "float32":
            message += " (a model of token ids: pass --input-dtype int64)"
        print(f"warning: {message}", file=sys.stderr)
    print(plan)
    return 0


def _in_command_words(message: str) -> str:
    """``message`` with the Python API's advice about example inputs put as this command's option."""
    from lightning_amct.graph import HOW_TO_GIVE_INPUTS

    return message.replace(HOW_TO_GIVE_INPUTS, "pass --input-shape (or give the module an example_input_array)")


def _print_own_warnings_as_lines() -> None:
    """Print this package's warnings as ``warning: message`` lines, as ``plan`` does, each once,
    in every subcommand: the config's say where in the file, and the source line that raised
    them says nothing to a user of the command (a run reads its config at each stage, and
    Python's once-per-place rule forgets what it showed whenever a library changes the warning
    filters). Other libraries' warnings keep Python's format."""
    if getattr(warnings.showwarning, "prints_own_warnings", False):  # main() called again in this process
        return
    package = Path(__file__).parent
    shown_by_python = warnings.showwarning
    printed: set[str] = set()

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # warnings.showwarning's signature
        if not (category.__module__.startswith(f"{__package__}.") or Path(filename).is_relative_to(package)):
            shown_by_python(message, category, filename, lineno, file, line)
        elif str(message) not in printed:
            printed.add(str(message))
            print(f"warning: {message}", file=file or sys.stderr)

    show.prints_own_warnings = True
    warnings.showwarning = show


def _import_from_the_working_directory() -> None:
    """Let class paths name modules in the working directory (``--model mymodel.MyNet``), as
    ``python -m`` does; a console script's import path starts at its own folder instead."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-amct`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Lightning 2.6 builds torch's LeafSpec, which torch now deprecates, in every fit and test:
    # repeated noise that a user cannot act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    _print_own_warnings_as_lines()
    _import_from_the_working_directory()
    if not argv:
        _parser().print_help(sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    if argv[0] == "plan":
        return plan_command(argv[1:])
    if argv[0] == "run":
        from lightning_amct.pipeline import run_command

        return run_command(argv[1:])
    if argv[0] not in _LIGHTNING_SUBCOMMANDS and not argv[0].startswith("-"):
        _parser().parse_args(argv[:1])  # exits with argparse's message listing the subcommands
    from lightning_amct.lightning_cli import run_lightning_cli

    run_lightning_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
