"""``lightning-amct`` itself: every subcommand listed, and no Lightning import where none is needed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_amct.cli import SUBCOMMANDS, main

EVERY_SUBCOMMAND = ["run", "plan", "fit", "validate", "test", "predict"]


def _listed(text: str) -> dict[str, str]:
    """Subcommand -> its line in a help text."""
    rows = (line.split(maxsplit=1) for line in text.splitlines() if line.startswith("    "))
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in EVERY_SUBCOMMAND}


def test_help_lists_every_subcommand_on_one_line(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["--help"]) == 0
    listed = _listed(capsys.readouterr().out)
    assert list(listed) == EVERY_SUBCOMMAND == list(SUBCOMMANDS)
    assert listed == SUBCOMMANDS  # each line whole: nothing wrapped onto a second line


def test_bare_command_shows_the_same_list_and_fails(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    assert main([]) == 2
    assert list(_listed(capsys.readouterr().err)) == EVERY_SUBCOMMAND


def test_unknown_subcommand_names_the_valid_ones(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fitt"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fitt' (choose from 'run', 'plan', 'fit', 'validate', 'test', 'predict')" in (
        capsys.readouterr().err
    )


def test_help_plan_and_recipe_errors_do_not_import_lightning(tmp_path) -> None:
    """Lightning costs seconds to import, torch's compiler one more: ``--help``, ``plan`` of a
    plain nn.Module and a recipe with a typo need neither."""
    typo = tmp_path / "typo.yaml"
    typo.write_text("float: {epochs: 1}\ncompress: {config: x.cfg, epoch: 1}\n")
    script = f"""
import sys, time
start = time.perf_counter()
from lightning_amct.cli import main
assert main(["--help"]) == 0
cfg = "retrain_data_quant_config {{ ulq_quantize {{}} }}"
assert main(["plan", "--cfg", cfg, "--model", "lightning_amct.demo:DemoNet", "--input-shape", "1,1,8,8"]) == 0
assert main(["plan", "--cfg", cfg, "--model", "lightning_amct.demo:Nope"]) == 2
assert main(["run", {str(typo)!r}]) == 2
print("LOADED", sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning")))
print("DYNAMO", "torch._dynamo" in sys.modules)  # 0.8 s to import; the graph capture needs none of it
print(f"SECONDS {{time.perf_counter() - start:.2f}}")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "LOADED []" in done.stdout and "DYNAMO False" in done.stdout
    assert "stem.conv" in done.stdout  # the plan was printed
    assert "compress: unknown key 'epoch', did you mean 'epochs'?" in done.stderr


def test_the_package_s_warnings_print_as_one_line_in_every_subcommand(
    capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A recipe's config warning in ``run`` reads as ``plan`` prints it, once, without Python's source line."""
    import warnings

    from lightning_amct.config.locations import SourceMap

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # put back after the test
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    main(["--help"])
    installed = warnings.showwarning
    main(["--help"])
    assert warnings.showwarning is installed, "installed once per process"
    capsys.readouterr()
    source = SourceMap("quant.cfg", {("skip_layers", 1): (2, 1)})
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        source.warn("skip_layers: 'a' listed twice", ("skip_layers", 1))
        warnings.resetwarnings()  # as a library's catch_warnings would: Python shows it again
        warnings.simplefilter("always")
        source.warn("skip_layers: 'a' listed twice", ("skip_layers", 1))
        warnings.warn("another library's warning", UserWarning, stacklevel=1)  # from this file
    # the other library's warning goes to Python's handler, which pytest records here
    assert capsys.readouterr().err.splitlines() == [
        "warning: quant.cfg:2:1: skip_layers[1]: skip_layers: 'a' listed twice"
    ]
