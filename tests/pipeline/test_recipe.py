"""Recipes: every shipped one is valid, and a wrong one fails before training, naming valid keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lightning_amct.config import ConfigError, ConfigWarning
from lightning_amct.pipeline import RecipeError, load_recipe, parse_recipe
from lightning_amct.demo import DemoClassifier
from lightning_amct.pipeline.recipe import FloatStage
from lightning_amct.pipeline.stages import compression_callback

RECIPES = Path(__file__).parents[2] / "recipes"
NAMES = ["quant", "a8w4", "prune", "selective_prune", "compressed1", "compressed2"]
MINIMAL = {"float": {"epochs": 1}, "compress": {"config": str(RECIPES / "quant.cfg"), "epochs": 1}}


@pytest.mark.parametrize("name", NAMES)
def test_every_recipe_runs_its_own_config_on_the_demo(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(RECIPES.parent)  # recipe paths are relative to the repository root
    recipe = load_recipe(RECIPES / f"{name}.yaml")
    assert recipe.name == name
    # the main job quantizes the input conv too, which the AMCT sample quant.cfg leaves in float
    assert recipe.compress_stage.config == f"recipes/{'quant_deploy' if name == 'quant' else name}.cfg"
    assert recipe.float_stage == FloatStage(epochs=8)
    assert recipe.compress_stage.quantize_outputs == (name == "quant")  # the main job deploys in integers
    assert recipe.model.class_path == "lightning_amct.demo.DemoClassifier"
    assert recipe.data.class_path == "lightning_amct.demo.DigitsDataModule"
    assert recipe.output_dir == Path("runs") / name


def test_budget_shrinks_both_stages_and_can_start_from_a_float_checkpoint(tmp_path: Path) -> None:
    recipe = parse_recipe(MINIMAL, name="quant").with_budget(epochs=2, limit_batches=3, output_dir="out")
    assert recipe.float_stage.epochs == recipe.compress_stage.epochs == 2
    assert recipe.trainer == {"limit_train_batches": 3, "limit_val_batches": 3, "limit_test_batches": 3}
    assert recipe.output_dir == Path("out")
    checkpoint = tmp_path / "float.ckpt"
    checkpoint.write_bytes(b"")
    assert recipe.with_budget(float_ckpt=str(checkpoint), epochs=1).float_stage == FloatStage(ckpt_path=str(checkpoint))
    with pytest.raises(RecipeError, match=r"^--float-ckpt: no such file: nope\.ckpt \(relative paths are read from"):
        recipe.with_budget(float_ckpt="nope.ckpt")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"compress": {"config": "x.cfg", "epoch": 6}}, "compress: unknown key 'epoch', did you mean 'epochs'? (valid keys: config, epochs, log_every_n_steps, quantize_outputs)"),
        ({"float": {"epochs": 8, "ckpt_path": "f.ckpt"}}, "float: give exactly one of epochs"),
        ({"float": {"epochs": 0}}, "float.epochs: expected a positive integer, got 0"),
        ({"trainer": {"max_epochs": 3}}, "trainer.max_epochs: set by the stages; use float.epochs and compress.epochs"),
        ({"trainer": {"acelerator": "cpu"}}, "trainer: unknown key 'acelerator', did you mean 'accelerator'? (valid keys: accelerator, strategy,"),
        ({"evaluate": {"metric": "test_acc", "runs": 3}}, "evaluate: unknown key 'runs' (valid keys: metric, latency_batch_size, latency_runs, latency_threads)"),
        ({"compress": {"config": "nope/quant.cfg", "epochs": 1}}, "compress.config: no such file: nope/quant.cfg (relative paths are read from the current directory"),
        ({"float": {"ckpt_path": "runs/nope/float.ckpt"}}, "float.ckpt_path: no such file: runs/nope/float.ckpt (relative paths are read from the current directory"),
        ({"compress": {"config": str(RECIPES / "quant.cfg"), "epochs": 1, "quantize_outputs": "yes"}}, "compress.quantize_outputs: expected true or false, got 'yes'"),
        ({"seeds": 1}, "the recipe: unknown key 'seeds', did you mean 'seed'? (valid keys: name, model, data, float, compress, trainer,"),
    ],
)  # fmt: skip
def test_schema_errors_name_the_key_and_the_valid_ones(change: dict, message: str) -> None:
    with pytest.raises(RecipeError, match="^" + re.escape(message)):
        parse_recipe({**MINIMAL, **change})


def test_missing_section_and_bad_retrain_config_fail_before_training(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="the recipe: missing key 'compress'"):
        parse_recipe({"float": {"epochs": 1}})
    bad = tmp_path / "bad.cfg"
    bad.write_text("retrain_weight_quant_config {\n  arq_retrain { dst_type: INT9 }\n}\n")
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"float: {{epochs: 1}}\ncompress: {{config: {bad}, epochs: 1}}\n")
    with pytest.raises(ConfigError, match=f"^{bad}:2:.*INT9"):
        load_recipe(recipe)


def test_unreadable_or_non_mapping_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- float\n- compress\n")
    with pytest.raises(RecipeError, match=f"^{listing}: the recipe: expected a mapping"):
        load_recipe(listing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("float: {epochs: 1}\ncompress: {config: recipes/quant.cfg, epochs: 1\n")
    with pytest.raises(RecipeError, match=f"^{broken}:3:1: not valid YAML: expected ',' or '}}'"):
        load_recipe(broken)


MAIN_JOB = (RECIPES / "quant.yaml").read_text()


def _line_of(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column where ``needle`` starts in ``text`` (after its newline, if it starts
    with one; at its ``|``, if it has one: ``"epochs: |0"`` is the value's column)."""
    offset = max(needle.find("|"), 0 + needle.startswith("\n"))
    before = text[: text.index(needle.replace("|", "")) + offset]
    return before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1


@pytest.mark.parametrize(
    ("old", "new", "at", "message"),
    [
        ("  epochs: 6\n", "  epoch: 6\n", "epoch:", "compress: unknown key 'epoch', did you mean 'epochs'?"),
        ("  accelerator: cpu", "  acelerator: cpu", "acelerator", "trainer: unknown key 'acelerator', did you mean 'accelerator'?"),
        ("seed: 0", "seeds: 0", "seeds", "the recipe: unknown key 'seeds', did you mean 'seed'?"),
        ("  epochs: 8", "  epochs: 0", "epochs: |0", "float.epochs: expected a positive integer, got 0"),
        ("  class_path: lightning_amct.demo.DigitsDataModule\n", "", "\ndata:", "data: missing key 'class_path'"),
        ("  quantize_outputs: true", "  quantize_outputs: yes please", "quantize_outputs: |yes", "compress.quantize_outputs: expected true or false"),
        ("  accelerator: cpu", "  accelerator: cpux", "accelerator: |cpux", "trainer.accelerator: ValueError: You selected an invalid accelerator name"),
        ("  devices: 1", "  devices: banana", "devices: |banana", "trainer.devices: TypeError: `devices` selected with `CPUAccelerator`"),
        ("  log_every_n_steps: 5", "  log_every_n_steps: many", "log_every_n_steps: |many", "trainer.log_every_n_steps: expected int or None (the Trainer's argument), got 'many'"),
        ("  deterministic: true", "  deterministic: maybe", "deterministic: |maybe", "trainer.deterministic: expected bool, 'warn' or None"),
        ("  devices: 1", "  devices: 1\n  accumulate_grad_batches: 0", "accumulate_grad_batches: |0", "trainer.accumulate_grad_batches: expected a number above 0, got 0"),
        ("  devices: 1", "  devices: 2\n  strategy: ddp_spawn", "strategy: |ddp_spawn", "trainer.strategy: this strategy starts the processes of its ranks itself (spawn or fork)"),
    ],
)  # fmt: skip
def test_recipe_file_errors_point_at_the_line(
    old: str, new: str, at: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(RECIPES.parent)
    assert old in MAIN_JOB
    text = MAIN_JOB.replace(old, new, 1)
    recipe = tmp_path / "quant.yaml"
    recipe.write_text(text)
    line, column = _line_of(text, at)
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert str(error.value).startswith(f"{recipe}:{line}:{column}: {message}")
    assert (error.value.path, error.value.line, error.value.column) == (str(recipe), line, column)


INLINE = """\
float: {epochs: 1}
compress:
  epochs: 1
  config:
    retrain_data_quant_config:
      ulq_quantize: {dst_type: INT8}
    skip_layers: [net.stem.conv, net.stem.cnv]
"""


def test_a_retrain_config_written_in_the_recipe_is_located_in_its_file(tmp_path: Path) -> None:
    recipe = tmp_path / "inline.yaml"
    recipe.write_text(INLINE.replace("{dst_type: INT8}", "{dst_typ: INT8}"))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}:6:22: retrain_data_quant_config\.ulq_quantize"
                       r"\.dst_typ: unknown field"):  # fmt: skip
        load_recipe(recipe)
    recipe.write_text(INLINE)
    callback = compression_callback(load_recipe(recipe))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}:7:34: skip_layers\[1\]: no layer \"net.stem.cnv\""):
        callback.resolve(DemoClassifier())  # what the run checks before the float stage


INLINE_TEXT = """\
float: {epochs: 1}
compress:
  epochs: 1
  config: |

      retrain_data_quant_config { ulq_quantize { dst_type: INT8 } }
      skip_layers: "net.stem.conv"
      skip_layers: "net.stem.cnv"
"""


def test_retrain_config_text_in_a_literal_block_is_located_in_the_recipe(tmp_path: Path) -> None:
    """Config text in ``config: |`` is placed at its lines and columns in the recipe, not at ``<text>``:
    the syntax, the schema, the warnings, and a layer the model lacks."""
    recipe = tmp_path / "text.yaml"
    text = INLINE_TEXT.replace("dst_type: INT8", "dst_type: INT9")
    recipe.write_text(text)
    line, column = _line_of(text, "INT9")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}:{line}:{column}: retrain_data_quant_config"
                       r"\.ulq_quantize\.dst_type: unknown value \"INT9\""):  # fmt: skip
        load_recipe(recipe)
    text = INLINE_TEXT + '      skip_layers: "net.stem.conv"\n'
    recipe.write_text(text)
    with pytest.warns(ConfigWarning, match=rf"^{re.escape(str(recipe))}:9:7: skip_layers\[2\]: .* already listed"):
        loaded = load_recipe(recipe)
    assert loaded.compress_stage.inline
    recipe.write_text(INLINE_TEXT)
    callback = compression_callback(load_recipe(recipe))
    line, column = _line_of(INLINE_TEXT, 'skip_layers: "net.stem.cnv"')
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}:{line}:{column}: skip_layers\[1\]: no layer"):
        callback.resolve(DemoClassifier())


def test_a_key_given_twice_is_refused_where_yaml_would_keep_the_last(tmp_path: Path) -> None:
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("float: {epochs: 1}\ncompress:\n  config: recipes/quant.cfg\n  epochs: 1\n  epochs: 3\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(recipe))}:5:3: compress.epochs: given twice \(also at line 4\)"):
        load_recipe(recipe)
