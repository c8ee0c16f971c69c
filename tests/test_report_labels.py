"""What a person sees in the evaluation report (issue 21 §4): sample grids labelled in their pixels (steps and NFE over
each column, the prompt left of each row; on every frame of a video grid), metric plots on a log y axis when the
values span decades, against steps or NFE (eval.plot_x)."""

import math

import numpy as np
import pytest
from PIL import Image

from pcm.config import ConfigError, config_from_dict
from pcm.eval import report

PROMPTS = ["a red circle at the top left on a gray background",
           "a blue square in the center on a white background " * 4]  # too long for its row: wrapped, then cut


def _tile(seed: int, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _rows(model: str, guidance_scale: float, steps=(1, 4)) -> list[dict]:
    """Step-table rows as pcm.eval.evaluate makes them (its nfe: steps, twice that with CFG > 1)."""
    return [{"model": model, "method": "pcm", "guidance_scale": guidance_scale, "steps": K,
             "nfe": K * (2 if guidance_scale != 1.0 else 1), "samples": 2} for K in steps]


def _dark(pixels: np.ndarray) -> int:
    return int((pixels.max(axis=-1) < 100).sum())


def test_a_grid_carries_steps_nfe_and_prompts_beside_the_enlarged_tiles(tmp_path):
    tiles = {(model, i, K): _tile(100 * i + K + (50 if model == "teacher-ddim" else 0))
             for model in ("pcm-M4", "teacher-ddim") for i in (0, 1) for K in (1, 4)}
    rows = _rows("pcm-M4", 1.0) + _rows("teacher-ddim", 5.5)
    grids = report.write_grids(tiles, tmp_path, rows, PROMPTS)
    assert set(grids) == {"pcm-M4", "teacher-ddim"}
    grid = np.asarray(Image.open(grids["pcm-M4"]).convert("RGB"))
    scale = report.MIN_TILE // 32  # 32 px tiles, enlarged pixel for pixel
    side = 32 * scale
    _, top, left = report.labelled_canvas((side, side), PROMPTS, ["", ""])
    assert grid.shape == (top + 2 * (side + report.GAP), left + 2 * (side + report.GAP), 3)
    for r, i in enumerate((0, 1)):
        for c, K in enumerate((1, 4)):
            y, x = top + r * (side + report.GAP), left + c * (side + report.GAP)
            enlarged = tiles[("pcm-M4", i, K)].repeat(scale, 0).repeat(scale, 1)
            assert np.array_equal(grid[y:y + side, x:x + side], enlarged), (i, K)
    assert _dark(grid[:top, left:left + side]) > 20 and _dark(grid[:top, left + side + report.GAP:]) > 20  # headers
    for r in range(2):  # each prompt left of its row
        assert _dark(grid[top + r * (side + report.GAP):top + r * (side + report.GAP) + side, :left]) > 50
    assert _dark(grid[:top, :left]) == 0  # the corner stays blank


def test_the_column_labels_are_the_step_tables_nfe_per_model(monkeypatch, tmp_path):
    """The teacher's DDIM at CFG 5.5 spends 2 NFE a step, the PCM LoRA at CFG 1 one: each grid's headers say so."""
    drawn = {}
    real = report.labelled_canvas

    def record(tile, row_labels, column_labels):
        drawn[tuple(column_labels)] = list(row_labels)
        return real(tile, row_labels, column_labels)

    monkeypatch.setattr(report, "labelled_canvas", record)
    tiles = {(model, i, K): _tile(i) for model in ("pcm-M4", "teacher-ddim") for i in (0, 1) for K in (1, 4)}
    report.write_grids(tiles, tmp_path, _rows("pcm-M4", 1.0) + _rows("teacher-ddim", 5.5), PROMPTS)
    assert drawn == {("1 step · NFE 1", "4 steps · NFE 4"): PROMPTS,
                     ("1 step · NFE 2", "4 steps · NFE 8"): PROMPTS}


def test_long_prompts_are_wrapped_and_cut_to_the_row():
    from PIL import ImageFont

    font = ImageFont.load_default(size=13)
    lines = report._wrap(PROMPTS[1], font, 160, 3)
    assert len(lines) == 3 and lines[-1].endswith("…") and all(font.getlength(line) <= 160 for line in lines)
    assert report._wrap("short prompt", font, 160, 3) == ["short prompt"]
    assert report._fit("x" * 500, font, 50).endswith("…") and font.getlength(report._fit("x" * 500, font, 50)) <= 50


def test_every_frame_of_a_video_grid_has_the_same_labels(tmp_path):
    frames = 3
    tiles = {("pcm-M2", i, K): _tile(10 * i + K, (frames, 16, 16, 3)) for i in (0, 1) for K in (1, 2)}
    grids = report.write_grids(tiles, tmp_path, _rows("pcm-M2", 1.0, steps=(1, 2)), PROMPTS)
    # the report embeds a lossless animated WebP: every frame exactly the drawn grid; a GIF of it lies beside
    webp, drawn = Image.open(grids["pcm-M2"]), report.grid_frames(
        np.stack([tiles[("pcm-M2", i, K)] for i in (0, 1) for K in (1, 2)]), PROMPTS, ["1 step · NFE 1",
                                                                                      "2 steps · NFE 2"])
    assert grids["pcm-M2"].suffix == ".webp" and webp.is_animated and webp.n_frames == frames
    for f in range(frames):
        webp.seek(f)
        assert np.array_equal(np.asarray(webp.convert("RGB")), drawn[f])
    gif = Image.open(grids["pcm-M2"].with_suffix(".gif"))
    assert gif.is_animated and gif.n_frames == frames
    side = 16 * (report.MIN_TILE // 16)
    _, top, left = report.labelled_canvas((side, side), PROMPTS, ["", ""])
    assert gif.size == (left + 2 * (side + report.GAP), top + 2 * (side + report.GAP))
    labels = []
    for f in range(frames):
        gif.seek(f)
        pixels = np.asarray(gif.convert("RGB"))
        labels.append(np.concatenate([pixels[:top].reshape(-1, 3), pixels[top:, :left].reshape(-1, 3)]))
        assert _dark(pixels[:top]) > 20 and _dark(pixels[top:, :left]) > 50
    assert all(np.array_equal(labels[0], other) for other in labels[1:])


def test_grid_frames_refuses_tiles_that_do_not_match_the_labels():
    with pytest.raises(ValueError, match="3 tiles for 2 row labels x 2 column labels"):
        report.grid_frames(np.zeros((3, 1, 8, 8, 3), np.uint8), ["a", "b"], ["1", "2"])


def _metric_rows(values: dict[int, float], guidance_scale: float = 1.0, model: str = "pcm-M4",
                 lows: dict[int, float] | None = None) -> list[dict]:
    rows = []
    for row, (K, v) in zip(_rows(model, guidance_scale, steps=tuple(values)), values.items(), strict=True):
        low = (lows or {}).get(K, v * 0.5)
        rows.append(row | {"fid": v, "fid/ci_low": low, "fid/ci_high": v * 1.5})
    return rows


@pytest.mark.parametrize("values, scale", [
    ({1: 1.0, 2: 1000.0}, "log"),  # FID from ~1 to 1000+: three decades
    ({1: 0.1, 2: 0.5}, "linear"),
    ({1: 2.0, 2: 20.0}, "linear"),  # max / min = 10: one decade, not more
    ({1: 0.0, 2: 1000.0}, "linear"),  # a 0 cannot be drawn on a log axis
    ({1: -1.0, 2: 1000.0}, "linear"),
    ({1: math.nan, 2: 1.0, 4: 500.0}, "log"),  # an undefined value is not plotted
])
def test_the_y_axis_is_logarithmic_when_the_values_span_more_than_a_decade(values, scale):
    fig = report.metric_figure(_metric_rows(values), "fid")
    assert fig.axes[0].get_yscale() == scale


def test_bars_on_a_log_axis_are_clipped_above_zero():
    rows = _metric_rows({1: 900.0, 2: 30.0, 4: 2.0}, lows={4: -3.0, 2: 0.0})  # intervals reaching 0 and below
    ax = report.metric_figure(rows, "fid").axes[0]
    assert ax.get_yscale() == "log"
    (bars,) = ax.collections
    ends = np.concatenate([segment[:, 1] for segment in bars.get_segments()])
    assert ends.min() == pytest.approx(0.2)  # a tenth of the smallest value
    assert sorted(ends.max() for ends in (s[:, 1] for s in bars.get_segments())) == [3.0, 45.0, 1350.0]


def test_against_nfe_the_x_values_are_the_rows_nfe(tmp_path):
    rows = _metric_rows({1: 5.0, 4: 3.0}, guidance_scale=5.5, model="teacher-ddim") + _metric_rows({1: 4.0, 4: 2.0})
    by_steps = report.metric_figure(rows, "fid").axes[0]
    by_nfe = report.metric_figure(rows, "fid", x="nfe").axes[0]
    assert [list(line.get_xdata()) for line in by_steps.get_lines()] == [[1, 4], [1, 4]]
    assert [list(line.get_xdata()) for line in by_nfe.get_lines()] == [[2, 8], [1, 4]]
    assert by_nfe.get_xlabel().startswith("NFE") and by_steps.get_xlabel() == "sampling steps"
    assert report.plot_metric(rows, "fid", tmp_path / "fid.png", x="nfe").stat().st_size > 0
    with pytest.raises(ValueError, match=r"plot x='flops': allowed values: steps, nfe \(eval.plot_x\)"):
        report.metric_figure(rows, "fid", x="flops")


def test_eval_plot_x_is_checked_at_load():
    assert config_from_dict({}).eval.plot_x == "steps"
    assert config_from_dict({}, ["eval.plot_x=nfe"]).eval.plot_x == "nfe"
    with pytest.raises(ConfigError, match=r"eval.plot_x='flops': allowed values: steps, nfe"):
        config_from_dict({}, ["eval.plot_x=flops"])


def test_the_runs_note_heads_the_step_table_in_markdown_and_html(tmp_path):
    info = {"samples": 4, "prompts": 4, "seeds": [0], "bootstrap_resamples": 0}
    rows = [{"model": "pcm-M4", "method": "pcm", "guidance_scale": 1.0, "steps": 1, "nfe": 1, "samples": 4,
             "fid": 3.0}]
    assert report.table_header(info).startswith("N = 4 samples")  # no note: the N line alone
    noted = {**info, "note": "A first look <on small budgets>"}
    assert report.table_header(noted).split("\n\n") == ["A first look <on small budgets>",
                                                          report.table_header(info)]
    table = report.markdown_table(rows, report.table_header(noted))
    assert table.startswith("A first look <on small budgets>\n\nN = 4")
    report.write_html(tmp_path / "r.html", rows, noted, {}, {}, [])
    page = (tmp_path / "r.html").read_text()
    assert "<h2 id='steps'>Step table</h2><p>A first look &lt;on small budgets&gt;</p><p>N = 4 samples" in page
    assert config_from_dict({}, ["eval.note=a first look"]).eval.note == "a first look"
