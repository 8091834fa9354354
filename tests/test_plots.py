"""The clip plot shows every quantizer, outputs included, on axes that show how the clips moved."""

from __future__ import annotations

from pathlib import Path

from lightning_amct.plots import clip_history_figure, plot_clip_history

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _history() -> list[dict[str, float]]:
    return [
        {
            "step": float(step),
            "amct/net.fc/clip_max": 6.0 - 0.05 * step,  # drifts by 7%
            "amct/net.fc/clip_min": 0.0,  # fixed_min
            "amct/net.block.bn2/output_clip_max": 4.0 + 0.01 * step,
            "amct/net.block.bn2/output_clip_min": -3.0 - 0.02 * step,
        }
        for step in range(10)
    ]


def test_output_quantizers_get_panels_of_their_own(tmp_path: Path) -> None:
    figure = clip_history_figure(_history())
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert titles == ["net.fc: [0, 6] → [0, 5.55]", "net.block.bn2 (output): [-3, 4] → [-3.18, 4.09]"]
    path = plot_clip_history(_history(), tmp_path / "clips.png")
    assert path.read_bytes().startswith(PNG_MAGIC)


def test_each_axis_spans_the_values_taken_not_zero() -> None:
    figure = clip_history_figure(_history())
    clip_max_axis = next(ax for ax in figure.axes if ax.get_title().startswith("net.fc"))
    low, high = clip_max_axis.get_ylim()
    assert 5.3 < low < 5.55 and 6.0 < high < 6.3  # the 7% drift fills the panel
    output_axis = next(ax for ax in figure.axes if ax.get_title().startswith("net.block.bn2"))
    assert output_axis.get_ylim()[0] > 3.9


def test_nothing_logged_draws_nothing(tmp_path: Path) -> None:
    assert plot_clip_history([{"step": 1.0}], tmp_path / "clips.png") is None
    assert not (tmp_path / "clips.png").exists()
