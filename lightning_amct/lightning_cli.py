"""``lightning-amct fit|validate|test|predict``: Lightning's own CLI, for any module and data.

The model and the data are given by class path (``--model``, ``--data``; default: the bundled
demo classifier and digits), so any LightningModule and LightningDataModule work unchanged, and
compression is one more callback, from a YAML config::

    trainer:
      callbacks:
        - class_path: lightning_amct.CompressionCallback
          init_args: {config: recipes/quant.cfg}

or from the command line::

    lightning-amct fit --trainer.callbacks+=lightning_amct.CompressionCallback \\
        --trainer.callbacks.config=recipes/quant.cfg --trainer.max_epochs=6

Everything else is Lightning's CLI as documented (``--print_config``, ``--config``,
``--ckpt_path``); the config of each run is saved next to its logs (overwritten on a rerun in the
same directory). A compressed checkpoint is evaluated with the same callback:
``lightning-amct test --config run.yaml --ckpt_path last.ckpt`` rebuilds the pruned, quantized
structure before loading the weights; given without the callback, ``fit`` (resuming),
``validate``, ``test`` and ``predict`` add it, with the config the checkpoint's record holds.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import yaml
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_amct.callback import CompressionCallback, SetupError
from lightning_amct.config import ConfigError
from lightning_amct.modules.apply import CompressionState
from lightning_amct.training.checkpoint_record import checkpoint_problem, read_record

DEFAULT_MODEL = "lightning_amct.demo.DemoClassifier"
DEFAULT_DATA = "lightning_amct.demo.DigitsDataModule"


class AmctLightningCLI(LightningCLI):
    """Lightning's CLI in subclass mode, defaulting to the demo model and data.

    The demo classes are given as the first arguments where the command line and its ``--config``
    files name no class of their own, not as the parser's defaults: the parser keeps the init
    arguments of a default class when another replaces it, so a user's ``lr`` would take the
    demo's value.
    """

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Sequence[str]) -> None:
        # The console script hands over its own argv, so args and sys.argv are the same words:
        # the base class's warning about giving both does not apply.
        self.config = parser.parse_args(with_default_classes(args))
        subcommand = self.config.get("subcommand")
        _check_ckpt_path(self.config[subcommand].get("ckpt_path") if subcommand else None)

    def before_fit(self) -> None:
        self._callback_for_a_compressed_checkpoint()

    def before_validate(self) -> None:
        self._callback_for_a_compressed_checkpoint()

    def before_test(self) -> None:
        self._callback_for_a_compressed_checkpoint()

    def before_predict(self) -> None:
        self._callback_for_a_compressed_checkpoint()

    def _callback_for_a_compressed_checkpoint(self) -> None:
        """Run a compressed ``--ckpt_path`` given without the callback with the callback its record
        names (its own config; artifacts where ``fit`` resumes its compression training, none where
        it is evaluated): the structure it was trained in, rebuilt before the weights load, which
        a plain module refuses (``act_quant.clip_max`` unexpected)."""
        path = self.config_init[self.subcommand].get("ckpt_path")
        if not path or not Path(path).exists() or any(isinstance(c, CompressionCallback) for c in self.trainer.callbacks):
            return
        record = read_record(str(path))
        if record is None:
            return
        state = CompressionState.from_record(record)
        quantize_outputs = bool(state.plan.outputs or state.plan.gates)
        fit = self.subcommand == "fit"
        callback = CompressionCallback(state.config_text, export=fit, quantize_outputs=quantize_outputs)
        self.trainer.callbacks.append(callback)
        runs = "fit resumes its compression training" if fit else f"{self.subcommand} runs it"
        rank_zero_info(f"lightning-amct: {path} holds a compressed model: {runs} with its own config")


def _check_ckpt_path(path: str | None) -> None:
    """Exit with status 2 after one line where a local ``--ckpt_path`` is missing or is no
    readable Lightning checkpoint: before Lightning's CLI reads its hyperparameters (a traceback)."""
    if not path or not _is_local_path(path):
        return
    if not Path(path).exists():
        problem = f"no such file: {path}"
    else:  # a distributed checkpoint's directory is Lightning's to read
        problem = checkpoint_problem(str(path)) if Path(path).is_file() else None
    if problem is not None:
        print(f"error: --ckpt_path: {problem}", file=sys.stderr)
        raise SystemExit(2)


def _is_local_path(ckpt_path: str) -> bool:
    """Whether ``--ckpt_path`` names a file on this machine: not one of the words Lightning resolves
    itself (``best``, ``last``, ``hpc``, ``registry``...) nor a remote URL (``s3://...``)."""
    return "://" not in ckpt_path and ckpt_path.split(":")[0] not in ("best", "last", "hpc", "registry")


def with_default_classes(args: Sequence[str]) -> list[str]:
    """``args`` with ``--model``/``--data`` naming the demo classes right after the subcommand,
    for each of the two that neither an argument nor a ``--config`` file names a class for.

    Example:
        >>> with_default_classes(["fit", "--model=mymodule.Net", "--trainer.max_epochs=1"])
        ['fit', '--data=lightning_amct.demo.DigitsDataModule', '--model=mymodule.Net', '--trainer.max_epochs=1']
    """
    args = list(args)
    if not args or args[0].startswith("-"):
        return args
    given = set()
    for index, arg in enumerate(args):
        for key in ("model", "data"):
            flags = (f"--{key}", f"--{key}.class_path")
            if arg in flags or arg.startswith(tuple(f"{flag}=" for flag in flags)):
                given.add(key)
        if arg in ("--config", "-c") or arg.startswith("--config="):
            source = arg.partition("=")[2] if "=" in arg else (args[index + 1] if index + 1 < len(args) else "")
            given.update(_classes_in_config(source))
    defaults = {"model": DEFAULT_MODEL, "data": DEFAULT_DATA}
    return [args[0], *(f"--{key}={cls}" for key, cls in defaults.items() if key not in given), *args[1:]]


def _classes_in_config(source: str) -> set[str]:
    """``model`` and ``data`` where the ``--config`` file (or YAML text) names their class."""
    try:
        text = Path(source).read_text() if Path(source).is_file() else source
        config = yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return set()  # the parser says what is wrong with it
    if not isinstance(config, dict):
        return set()
    named = {key: config.get(key) for key in ("model", "data")}
    return {key for key, value in named.items() if isinstance(value, str) or "class_path" in (value or ())}


def run_lightning_cli(argv: Sequence[str]) -> AmctLightningCLI:
    """Run the Lightning subcommand in ``argv`` (``fit``, ``validate``, ``test``, ``predict``).

    Args:
        argv: the words after ``lightning-amct``, e.g. ``["fit", "--trainer.max_epochs=2"]``.

    Returns:
        The CLI, whose ``trainer`` and ``model`` hold the finished run.

    Raises:
        SystemExit: status 2 after one line on stderr when the compression config is invalid
            (as ``lightning-amct plan`` does), ``--ckpt_path`` names no readable Lightning
            checkpoint, or the callback refuses the run in its setup (a checkpoint of another
            config, say); Lightning's CLI also exits on bad arguments and after ``--help`` or
            ``--print_config``.

    Example:
        >>> cli = run_lightning_cli(["fit", "--trainer.fast_dev_run=true"])  # doctest: +SKIP
        >>> type(cli.model).__name__  # doctest: +SKIP
        'DemoClassifier'
    """
    try:
        return AmctLightningCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lightning-amct"},
            args=list(argv),
        )
    except ValueError as exc:
        cause = _reported_error(exc)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from exc


def _reported_error(exc: BaseException | None) -> ValueError | None:
    """The ConfigError or the callback's SetupError behind ``exc`` (jsonargparse wraps one raised
    while building a callback), which the command reports as one line."""
    while exc is not None and not isinstance(exc, (ConfigError, SetupError)):
        exc = exc.__cause__
    return exc
