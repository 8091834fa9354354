"""The recipe: one YAML file that says how to get from a float model to its compressed artifacts.

A recipe names the model and data (class paths, as Lightning's CLI writes them), where the float
starting point comes from (train it here for ``epochs``, or load a Lightning checkpoint), the
compression stage (the retrain config and its epochs), the Trainer settings shared by both stages,
and where the results go. Every section is checked when the file is read, before anything trains:
an unknown key is an error that lists the valid ones, and the retrain config is loaded and
validated too.

Relative paths (``compress.config``, ``float.ckpt_path``, ``output_dir``) are read from the
current directory, as for Lightning's CLI configs: run recipes from the repository root.

Without ``model``, the run compresses the demo classifier. Without ``data``, it trains on the
model's own dataloaders where the model defines ``train_dataloader``, else on the demo digits.

Example recipe::

    model: {class_path: lightning_amct.demo.DemoClassifier}
    data: {class_path: lightning_amct.demo.DigitsDataModule, init_args: {batch_size: 64}}
    float: {epochs: 8}                 # or {ckpt_path: runs/quant/float.ckpt}
    compress: {config: recipes/quant.cfg, epochs: 6}
    trainer: {accelerator: cpu, deterministic: true}
    output_dir: runs/quant

Example:
    >>> compress = {"config": "retrain_data_quant_config { ulq_quantize {} }", "epochs": 1}
    >>> recipe = parse_recipe({"float": {"epochs": 2}, "compress": compress})
    >>> recipe.float_stage.epochs, recipe.model.class_path, recipe.evaluate.metric
    (2, 'lightning_amct.demo.DemoClassifier', 'test_acc')
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lightning_amct.config import FieldPath, SourceMap, load_config_with_locations
from lightning_amct.pipeline.annotations import describe, fits
from lightning_amct.pipeline.quiet import lightning_info_silenced
from lightning_amct.pipeline.recipe_source import RecipeError, RecipeSource, read_recipe_file, unknown_key_message

DEFAULT_MODEL = "lightning_amct.demo.DemoClassifier"
DEFAULT_DATA = "lightning_amct.demo.DigitsDataModule"

T = TypeVar("T")

#: Trainer arguments the stages set themselves, and the recipe key that sets each instead.
_STAGE_OWNED = {
    "max_epochs": "float.epochs and compress.epochs",
    "callbacks": "compress.config (the stages add their own callbacks)",
    "default_root_dir": "output_dir",
}


#: Trainer arguments that it accepts at 0 when built and divides by when it trains.
_ABOVE_ZERO = ("accumulate_grad_batches", "val_check_interval", "check_val_every_n_epoch")
_TOP_KEYS = ("name", "model", "data", "float", "compress", "trainer", "seed", "output_dir", "evaluate")


@dataclass(frozen=True)
class ClassSpec:
    """A class to instantiate: ``class_path`` (``package.module.Class``) and keyword ``init_args``."""

    class_path: str
    init_args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FloatStage:
    """Where the float model comes from: trained here for ``epochs``, or read from ``ckpt_path``."""

    epochs: int | None = None
    ckpt_path: str | None = None


@dataclass(frozen=True)
class CompressStage:
    """Compression training: the retrain ``config`` (a ``.cfg`` path, config text or a mapping) for ``epochs``.

    ``log_every_n_steps`` is how often the callback records clips (default: the Trainer's);
    ``quantize_outputs`` is the callback's option of that name (integer deploy models throughout).
    ``config_locations``: where the recipe's file wrote the fields of a config given as a mapping,
    or as text in a literal block (``config: |``); ``inline``: the config is the recipe's own.
    """

    config: str | Mapping[str, Any]
    epochs: int
    log_every_n_steps: int | None = None
    quantize_outputs: bool = False
    config_locations: SourceMap = field(default_factory=SourceMap, compare=False)
    inline: bool = False


@dataclass(frozen=True)
class Evaluate:
    """What the summary compares: the test ``metric``, and ONNX Runtime latency.

    Latency is the median of ``latency_runs`` runs per model at ``latency_batch_size``, with
    ``latency_threads`` intra-op threads (0: ONNX Runtime's default, one per core). One thread,
    the default, is timed by the CPU time of the thread that computes: the figure hardly depends
    on what else the machine runs, so two runs agree (see :mod:`~lightning_amct.pipeline.measure`).
    The training steps in turns on the CPU run on as many torch threads, timed the same way
    (0: torch's threads as they are; :mod:`~lightning_amct.pipeline.step_time`).
    """

    metric: str = "test_acc"
    latency_batch_size: int = 64
    latency_runs: int = 100
    latency_threads: int = 1


@dataclass(frozen=True)
class Recipe:
    """A validated recipe (see the module docstring for the YAML form)."""

    name: str
    float_stage: FloatStage
    compress_stage: CompressStage
    output_dir: Path
    model: ClassSpec = ClassSpec(DEFAULT_MODEL)
    #: None: the model's own dataloaders, or the demo digits (see the module docstring).
    data: ClassSpec | None = None
    trainer: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0
    evaluate: Evaluate = Evaluate()
    source: RecipeSource = field(default_factory=RecipeSource, compare=False, repr=False)
    #: The key paths that command-line options set instead of the file (``--float-ckpt``), and those options.
    options: Mapping[tuple[str, ...], str] = field(default_factory=dict, compare=False, repr=False)

    def error(self, message: str, *key_path: str) -> RecipeError:
        """A :class:`RecipeError` about ``key_path`` (``"float", "ckpt_path"``), at its line in the file,
        or about the command-line option that set it (``--float-ckpt: ...``)."""
        option = self.options.get(key_path)
        if option is not None:
            return RecipeSource().error(message, (option,))
        return self.source.error(message, key_path)

    def with_budget(
        self,
        epochs: int | None = None,
        limit_batches: int | None = None,
        output_dir: str | Path | None = None,
        float_ckpt: str | None = None,
    ) -> Recipe:
        """A copy for a smaller or redirected run (the options of ``lightning-amct run``).

        Args:
            epochs: epochs of both stages (a float stage read from a checkpoint stays so).
            limit_batches: train, validation and test batches per epoch.
            output_dir: where the results go instead.
            float_ckpt: start from this float checkpoint instead of training one.
        """
        float_stage, compress_stage, trainer = self.float_stage, self.compress_stage, dict(self.trainer)
        options = dict(self.options)
        if float_ckpt is not None:
            float_stage = FloatStage(ckpt_path=_existing_file(float_ckpt, ("--float-ckpt",), RecipeSource()))
            options["float", "ckpt_path"] = "--float-ckpt"
        if output_dir is not None:
            options["output_dir",] = "--output-dir"
        if epochs is not None:
            _positive_int(epochs, ("--epochs",), RecipeSource())
            if float_stage.epochs is not None:
                float_stage = FloatStage(epochs=epochs)
            compress_stage = dataclasses.replace(compress_stage, epochs=epochs)
        if limit_batches is not None:
            _positive_int(limit_batches, ("--limit-batches",), RecipeSource())
            trainer.update({f"limit_{split}_batches": limit_batches for split in ("train", "val", "test")})
        return dataclasses.replace(
            self,
            float_stage=float_stage,
            compress_stage=compress_stage,
            trainer=trainer,
            output_dir=Path(output_dir) if output_dir is not None else self.output_dir,
            options=options,
        )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate the recipe at ``path``; its name defaults to the file's stem.

    Raises:
        RecipeError: the file cannot be read, is not a YAML mapping, or breaks the schema (the
            error names its line and column).
        ConfigError: the retrain config it names is invalid.
    """
    data, source = read_recipe_file(path)
    return parse_recipe(data, name=Path(path).stem, source=source)


def parse_recipe(data: object, name: str = "recipe", source: RecipeSource | None = None) -> Recipe:
    """Validate a recipe given as a mapping (what :func:`load_recipe` reads from YAML).

    Args:
        data: the recipe.
        name: its name when it states none (the summary's title and default output folder).
        source: where its keys were written in a file, for error messages.

    Raises:
        RecipeError: a key is unknown or missing, or a value has the wrong type.
        ConfigError: the retrain config is invalid.
    """
    src = source or RecipeSource()
    top = _mapping(data, (), src)
    _keys(top, _TOP_KEYS, ("float", "compress"), (), src)
    name = _string(top.get("name", name), ("name",), src)
    compress = _compress(top["compress"], src)
    origin = src.text_origin(("compress", "config"))  # config text in a literal block: placed in the recipe
    _, locations = load_config_with_locations(compress.config, compress.config_locations, origin)  # fail now
    if origin is not None:
        compress = dataclasses.replace(compress, config_locations=locations, inline=True)
    return Recipe(
        name=name,
        float_stage=_float(top["float"], src),
        compress_stage=compress,
        output_dir=Path(_string(top.get("output_dir", f"runs/{name}"), ("output_dir",), src)),
        model=_class_spec(top.get("model", {"class_path": DEFAULT_MODEL}), "model", src),
        data=_class_spec(top["data"], "data", src) if "data" in top else None,
        trainer=_trainer(top.get("trainer", {}), src),
        seed=_int(top.get("seed", 0), ("seed",), src),
        evaluate=_evaluate(top.get("evaluate", {}), src),
        source=src,
    )


def _float(data: object, src: RecipeSource) -> FloatStage:
    section = _mapping(data, ("float",), src)
    _keys(section, ("epochs", "ckpt_path"), (), ("float",), src)
    if len(section) != 1:
        message = "give exactly one of epochs (train the float model here) or ckpt_path (load it)"
        raise src.error(message, ("float",))
    if "epochs" in section:
        return FloatStage(epochs=_positive_int(section["epochs"], ("float", "epochs"), src))
    key_path = ("float", "ckpt_path")
    return FloatStage(ckpt_path=_existing_file(_string(section["ckpt_path"], key_path, src), key_path, src))


def _existing_file(path: str, key_path: FieldPath, src: RecipeSource) -> str:
    """``path``, which must name a file: found now, not after a stage has trained."""
    if not Path(path).is_file():
        message = f"no such file: {path} (relative paths are read from the current directory, {Path.cwd()})"
        raise src.error(message, key_path, value=True)
    return path


def _compress(data: object, src: RecipeSource) -> CompressStage:
    section = _mapping(data, ("compress",), src)
    valid = ("config", "epochs", "log_every_n_steps", "quantize_outputs")
    _keys(section, valid, ("config", "epochs"), ("compress",), src)
    config = section["config"]
    if not isinstance(config, (str, Mapping)):
        raise src.error(f"expected a .cfg path or a mapping, got {config!r}", ("compress", "config"), value=True)
    if isinstance(config, str) and config.endswith(".cfg"):
        _existing_file(config, ("compress", "config"), src)
    every = section.get("log_every_n_steps")
    quantize_outputs = section.get("quantize_outputs", False)
    if not isinstance(quantize_outputs, bool):
        message = f"expected true or false, got {quantize_outputs!r}"
        raise src.error(message, ("compress", "quantize_outputs"), value=True)
    return CompressStage(
        config=config,
        epochs=_positive_int(section["epochs"], ("compress", "epochs"), src),
        log_every_n_steps=None if every is None else _positive_int(every, ("compress", "log_every_n_steps"), src),
        quantize_outputs=quantize_outputs,
        config_locations=src.positions.within(("compress", "config")),
        inline=isinstance(config, Mapping),
    )


def _class_spec(data: object, key: str, src: RecipeSource) -> ClassSpec:
    section = _mapping(data, (key,), src)
    _keys(section, ("class_path", "init_args"), ("class_path",), (key,), src)
    init_args = _mapping(section.get("init_args") or {}, (key, "init_args"), src)
    return ClassSpec(_string(section["class_path"], (key, "class_path"), src), dict(init_args))


def _trainer(data: object, src: RecipeSource) -> dict[str, Any]:
    import lightning.pytorch as pl  # here, not at the top: the sections before fail without it
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    section = dict(_mapping(data, ("trainer",), src))
    for key in section:
        if key in _STAGE_OWNED:
            raise src.error(f"set by the stages; use {_STAGE_OWNED[key]}", ("trainer", key))
    valid = [name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self"]
    _keys(section, [name for name in valid if name not in _STAGE_OWNED], (), ("trainer",), src)
    _trainer_value_types(section, typing.get_type_hints(pl.Trainer.__init__), src)
    quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}

    def build(arguments: Mapping[str, Any]) -> pl.Trainer:
        return pl.Trainer(**{**quiet, **arguments})

    try:  # the values too, as the Trainer checks them when it is built: before anything trains
        trainer = _build_silenced(build, section)
    except Exception as exc:  # Lightning raises several types; its message says what is wrong
        key = failing_key(section, build)
        key_path = ("trainer",) if key is None else ("trainer", key)
        raise src.error(f"{type(exc).__name__}: {str(exc).splitlines()[0]}", key_path, value=key is not None) from exc
    if isinstance(trainer.strategy.launcher, _MultiProcessingLauncher):
        key = "strategy" if "strategy" in section else "devices"
        raise src.error(
            "this strategy starts the processes of its ranks itself (spawn or fork) and trains copies of the "
            "model there, while the run's later stages and measurements need the trained model in this "
            "process; use strategy: ddp (Lightning then starts the command once per device)",
            ("trainer", key),
            value=True,
        )
    return section


def _trainer_value_types(section: Mapping[str, Any], hints: Mapping[str, Any], src: RecipeSource) -> None:
    """The checks that building a Trainer skips and its training fails on: each value against the
    argument's annotation (``log_every_n_steps: many``), and the counts that must be above 0."""
    for key, value in section.items():
        if fits(value, hints.get(key, Any)) is False:
            message = f"expected {describe(hints[key])} (the Trainer's argument), got {value!r}"
            raise src.error(message, ("trainer", key), value=True)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in _ABOVE_ZERO and number and value <= 0:
            message = f"expected a number above 0, got {value!r} (the Trainer fails on it once it trains)"
            raise src.error(message, ("trainer", key), value=True)


def failing_key(arguments: Mapping[str, Any], build: Callable[[Mapping[str, Any]], object]) -> str | None:
    """The first key of ``arguments`` whose value alone makes ``build`` raise; None where only a
    combination of them does. A Trainer's error names no argument that the recipe could point at:
    this finds the line of the value it refuses (``devices: banana``), on the error's path only.

    Example:
        >>> def build(arguments):
        ...     if arguments.get("devices") == "banana" or {"a", "b"} <= arguments.keys():
        ...         raise ValueError("no")
        >>> failing_key({"accelerator": "cpu", "devices": "banana"}, build), failing_key({"a": 1, "b": 2}, build)
        ('devices', None)
    """
    for key, value in arguments.items():
        try:
            _build_silenced(build, {key: value})
        except Exception:  # any error of that value alone locates it
            return key
    return None


def _build_silenced(build: Callable[[Mapping[str, Any]], T], arguments: Mapping[str, Any]) -> T:
    with lightning_info_silenced():  # the stages' Trainers say it
        return build(arguments)


def _evaluate(data: object, src: RecipeSource) -> Evaluate:
    section = _mapping(data, ("evaluate",), src)
    _keys(section, [f.name for f in dataclasses.fields(Evaluate)], (), ("evaluate",), src)
    defaults = Evaluate()
    return Evaluate(
        metric=_string(section.get("metric", defaults.metric), ("evaluate", "metric"), src),
        latency_batch_size=_positive_int(
            section.get("latency_batch_size", defaults.latency_batch_size), ("evaluate", "latency_batch_size"), src
        ),
        latency_runs=_positive_int(
            section.get("latency_runs", defaults.latency_runs), ("evaluate", "latency_runs"), src
        ),
        latency_threads=_non_negative_int(
            section.get("latency_threads", defaults.latency_threads), ("evaluate", "latency_threads"), src
        ),
    )


def _keys(
    section: Mapping[str, Any], valid: Sequence[str], required: Sequence[str], key_path: FieldPath, src: RecipeSource
) -> None:
    for name in section:
        if name not in valid:
            raise src.error(unknown_key_message(name, valid), key_path, at=(*key_path, str(name)))
    for name in required:
        if name not in section:
            raise src.error(f"missing key {name!r} (valid keys: {', '.join(valid)})", key_path)


def _mapping(value: object, key_path: FieldPath, src: RecipeSource) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise src.error(f"expected a mapping, got {value!r}", key_path, value=True)
    return value


def _string(value: object, key_path: FieldPath, src: RecipeSource) -> str:
    if not isinstance(value, str) or not value:
        raise src.error(f"expected a non-empty string, got {value!r}", key_path, value=True)
    return value


def _int(value: object, key_path: FieldPath, src: RecipeSource) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise src.error(f"expected an integer, got {value!r}", key_path, value=True)
    return value


def _non_negative_int(value: object, key_path: FieldPath, src: RecipeSource) -> int:
    if _int(value, key_path, src) < 0:
        raise src.error(f"expected 0 or a positive integer, got {value!r}", key_path, value=True)
    return value


def _positive_int(value: object, key_path: FieldPath, src: RecipeSource) -> int:
    if _int(value, key_path, src) < 1:
        raise src.error(f"expected a positive integer, got {value!r}", key_path, value=True)
    return value
