"""Every command and snippet README.md shows runs as written, and every public name it shows exists.

The two opening commands (install and run the main job; install and run the tests) are CI's: the
main job takes minutes, so here it runs as README's own smoke variant (``--fast``), whose console
and summary are checked too. Everything else runs here, from a scratch directory that sees the
repository's ``recipes/`` as README's relative paths expect.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

import lightning_amct
from lightning_amct.class_path import import_object
from lightning_amct.cli import main
from lightning_amct.config import load_config
from lightning_amct.export.save import ARTIFACTS
from lightning_amct.pipeline import parse_recipe

REPO = Path(__file__).parents[1]
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.MULTILINE | re.DOTALL)
OPENING = [code for language, code in BLOCKS[:2]]


def _blocks(language: str) -> list[str]:
    return [code for lang, code in BLOCKS[2:] if lang == language]


def _commands() -> list[str]:
    """The shell commands of README's bash blocks after the opening two, continuation lines joined."""
    return [line for code in _blocks("bash") for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def _scripts() -> dict[str, str]:
    """README's python blocks that are whole scripts (``# name.py: run with ...`` first), by file name."""
    return {code.split(":")[0][2:]: code for code in _blocks("python") if re.match(r"# \w+\.py: ", code)}


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A scratch working directory; torch on one thread, which is what makes these runs short on a
    machine whose cores other work shares (idle OpenMP threads spinning against it slow each
    step tenfold), while changing nothing they compute."""
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield tmp_path
    finally:
        torch.set_num_threads(threads)


def test_opening_commands_are_the_main_job_and_ci() -> None:
    assert [language for language, _ in BLOCKS[:2]] == ["bash", "bash"]
    install_and_run, install_and_test = (code.strip() for code in OPENING)
    assert install_and_run.endswith("&& .venv/bin/lightning-amct run recipes/quant.yaml")
    assert install_and_test in (REPO / ".ci" / "run").read_text()  # CI runs README's test command


def test_every_command_is_one_of_ours() -> None:
    assert _commands() and all(command.startswith(("lightning-amct ", "torchrun ")) for command in _commands())
    smoke = [c for c in _commands() if c.startswith("lightning-amct run recipes/quant.yaml --fast")]
    assert smoke, "README shows the main job's smoke run, which the test suite runs for the first command"


@pytest.mark.parametrize(
    "command", [c for c in _commands() if c.startswith("lightning-amct ") and not c.startswith("lightning-amct run ")]
)
def test_command_runs_as_written(command: str, scratch: Path) -> None:
    assert main(shlex.split(command)[1:]) == 0


def test_main_job_smoke_run_explains_itself(
    scratch: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """README's ``run ... --fast``: one marker between the stages, Lightning's once-per-process lines
    and its layer summary once, a caveat instead of step ratios from a handful of steps, a word on
    the clip plot it cannot draw, and what the numbers add up to."""
    (command,) = [c for c in _commands() if c.startswith("lightning-amct run ")]
    assert main(shlex.split(command)[1:]) == 0
    out = capsys.readouterr().out
    logged = caplog.text
    output_dir = scratch / shlex.split(command)[shlex.split(command).index("--output-dir") + 1]

    assert logged.count("GPU available") == logged.count("TPU available") == 1
    assert logged.count("💡 Tip") <= 1
    assert out.count("Total params") == 1  # Lightning's layer summary, of the float stage only
    markers = [line.strip() for line in logged.splitlines() if "lightning-amct ──" in line]
    assert [marker.split("──")[1].split(":")[0].strip() for marker in markers] == [
        "float stage", "float stage done", "compression stage", "compression stage done",
    ]  # fmt: skip
    assert out.count("clip_ranges.png not drawn: the callback records clips every 5 steps") == 1  # a note

    summary = json.loads((output_dir / "summary.json").read_text())
    rows = {row["label"]: row for row in summary["rows"]}
    steps = rows["train step (median)"]
    assert steps["comparable"] is True and steps["float_value"] > 0 and steps["compressed_value"] > 0
    assert re.search(r"\| train step \(median\) .*\| \d+\.\d\dx +\|", out)  # timed in turns: a ratio after 4 steps
    notes = summary["notes"]
    assert notes[0].startswith("Deploy model: ") and "faster than float in ONNX Runtime (batch 64, 1 thread, CPU time)" in notes[0]
    assert notes[1].startswith("Settings: INT8 activations and INT8 weights on 6 of 6 layers")
    assert "quantize_outputs: 5 output quantizer(s)" in notes[1]
    assert not any(note.startswith("train step") for note in notes)
    assert all(note in out for note in notes)
    assert not (output_dir / "clip_ranges.png").exists()


def test_python_snippets_run_as_written(scratch: Path, capsys: pytest.CaptureFixture) -> None:
    snippets = [code for code in _blocks("python") if code not in _scripts().values()]
    assert len(snippets) == 2
    for code in snippets:
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102 - README's own code
    assert (scratch / "compressed" / "model_deploy_model.onnx").is_file()  # the callback's artifacts
    assert (scratch / "runs" / "readme" / "model_compressed.pt").is_file()
    assert re.search(r"tensor\(\[\d, \d\]\)", capsys.readouterr().out)


def test_torchrun_runs_the_fsdp2_script_as_written(scratch: Path) -> None:
    """README's FSDP2 script, saved under its name, started by README's torchrun command: two processes."""
    (command,) = [c for c in _commands() if c.startswith("torchrun ")]
    name = shlex.split(command)[-1]
    (scratch / name).write_text(_scripts()[name])
    torchrun = Path(sys.executable).with_name("torchrun")  # where pip installs it; else the same program
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    done = subprocess.run([*launcher, *shlex.split(command)[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert sorted(path.name for path in (scratch / "compressed").iterdir()) == sorted(
        f"model{suffix}" for suffix in ARTIFACTS.values()
    )


def test_retrain_config_snippet_loads() -> None:
    (config,) = _blocks("protobuf")
    assert load_config(config).skip_layers[0] == "net.stem.conv"


def test_recipe_snippet_is_a_valid_recipe(scratch: Path) -> None:
    (recipe,) = [code for code in _blocks("yaml") if code.startswith("model:")]
    parsed = parse_recipe(yaml.safe_load(recipe), name="readme")
    assert parsed.compress_stage.config == "recipes/quant_deploy.cfg" and parsed.compress_stage.quantize_outputs


def test_lightning_cli_config_snippet_fits(scratch: Path) -> None:
    (config,) = [code for code in _blocks("yaml") if code.startswith("trainer:")]
    assert "`lightning-amct fit --config run.yaml`" in README
    (scratch / "run.yaml").write_text(config)
    assert main(["fit", "--config", "run.yaml"]) == 0
    assert (scratch / "compressed" / "model_compressed.pt").is_file()


def test_every_public_name_readme_shows_exists() -> None:
    dotted = set(re.findall(r"\blightning_amct(?:\.\w+)+", README))
    imported = {
        f"lightning_amct.{name.strip()}"
        for names in re.findall(r"^from lightning_amct import (.+)$", README, flags=re.MULTILINE)
        for name in names.split(",")
    }
    assert {"lightning_amct.save_compressed", "lightning_amct.load_compressed"} <= dotted | imported
    for name in sorted(dotted | imported):
        import_object(name)  # raises, naming what is missing
    top_level = {name.split(".")[1] for name in dotted | imported}
    submodules = {"demo", "zoo"}
    assert top_level - submodules <= set(lightning_amct.__all__)
