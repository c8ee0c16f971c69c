"""The evaluation's outputs: metrics.json (flat, for `dvc metrics`), steps.csv (for `dvc plots`), steps.md, PNG plots
(each metric against steps or NFE, one line per model; a log y axis when the values span more than a decade), sample
grids (prompts x step counts, labelled in the pixels: steps and NFE over each column, the prompt left of each row;
animated GIFs for video) and one self-contained report.html (images embedded) that a Kubeflow HTML artifact can show.
A metric m with a 95 % interval (pcm.eval.intervals) has m/ci_low and m/ci_high beside it in every output: flat keys in
metrics.json, columns in steps.csv, "value [low, high]" in the tables, error bars in the plots. report.html also has
the anchors panel: the PCM paper's own FID-SD, beside ours only where the two are comparable."""

import base64
import csv
import html
import json
import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # a Figure of its own, not pyplot's: no display, no global state to close
from PIL import Image, ImageDraw, ImageFont

from pcm.eval.video import write_gif, write_webp

LOWER_IS_BETTER = ("fid", "fid_teacher", "trajectory_error")
METRICS = ("fid", "fid_teacher", "trajectory_error", "step_consistency", "clip_score", "oracle_colour", "oracle_kind",
           "oracle_position", "oracle_background", "oracle_overall", "frame_consistency", "frame_feature_consistency",
           "oracle_motion", "oracle_count")
COLUMNS = ("model", "method", "guidance_scale", "steps", "nfe", "samples")
CI_ENDS = ("ci_low", "ci_high")
# The PCM paper's FID-SD (FID against the teacher's own samples: our fid_teacher) at 1, 2, 4, 8, 16 steps, on its data
PAPER_FID_SD = {"sd15": ("Stable Diffusion v1.5", "COCO-30K", (8.27, 9.79, 5.81, 5.00, 4.70)),
                "sdxl": ("SDXL", "CC12M-30K", (8.76, 7.02, 6.59, 5.19, 4.92))}
PAPER_STEPS = (1, 2, 4, 8, 16)
PAPER_N = 30_000  # the paper's evaluation sets; FID is biased upward at smaller N, so fewer samples are not comparable


def _present(rows: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in rows)]


def _with_ci(rows: list[dict]) -> list[str]:
    """Every present metric followed by its interval's ends, where the rows have them."""
    return [k for m in _present(rows) for k in (m, *(f"{m}/{e}" for e in CI_ENDS)) if any(k in r for r in rows)]


def flat_metrics(rows: list[dict]) -> dict[str, float]:
    """{'<model>/k<steps>/<metric>': value} and '.../<metric>/ci_low', '.../ci_high': flat keys, so `dvc metrics diff`
    lines up rows across runs (an interval that cannot be computed, fewer than 2 prompts, is NaN)."""
    return {f"{r['model']}/k{r['steps']}/{k}": float(r[k]) for r in rows for k in _with_ci(rows) if k in r}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _cell(row: dict, column: str) -> str:
    """value, or "value [low, high]" where the metric has an interval ("n/a" for one that cannot be computed)."""
    text = _fmt(row.get(column, ""))
    if f"{column}/ci_low" not in row:
        return text
    low, high = row[f"{column}/ci_low"], row[f"{column}/ci_high"]
    return f"{text} [n/a]" if math.isnan(low) else f"{text} [{_fmt(low)}, {_fmt(high)}]"


def table_header(info: dict) -> str:
    """The lines above the step table: the run's note (eval.note) when it has one; N, and what the brackets are."""
    n = f"N = {info['samples']} samples per row ({info['prompts']} prompts x {len(info['seeds'])} seeds)"
    if not info.get("bootstrap_resamples"):
        line = f"{n}; no intervals (eval.bootstrap_resamples = 0)"
    else:
        line = (f"{n}; [low, high]: 95 % interval, bootstrap over the {info['prompts']} prompts "
                f"({info['bootstrap_resamples']} resamples)")
    return f"{info['note']}\n\n{line}" if info.get("note") else line


def markdown_table(rows: list[dict], header: str = "") -> str:
    columns = [*COLUMNS, *_present(rows)]
    lines = [f"{header}\n"] if header else []
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r, c) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    columns = [*COLUMNS, *_with_ci(rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


X_AXES = {"steps": "sampling steps", "nfe": "NFE (network evaluations per sample)"}  # eval.plot_x


def y_scale(values: np.ndarray) -> str:
    """'log' when the finite values are all > 0 and span more than a decade (max / min > 10: FID runs from ~1 to
    1000+), 'linear' otherwise."""
    finite = values[np.isfinite(values)]
    spans = finite.size > 0 and bool((finite > 0).all()) and finite.max() / finite.min() > 10
    return "log" if spans else "linear"


def metric_figure(rows: list[dict], metric: str, x: str = "steps") -> Figure:
    """metric against x (a row's 'steps' or 'nfe'; log2 axis), one line per model, vertical bars over the 95 %
    intervals; the better direction is in the title. On a log y axis a bar's lower end is clipped at a tenth of the
    smallest value (an interval may reach 0 or below, which a log axis cannot draw)."""
    if x not in X_AXES:
        raise ValueError(f"plot x={x!r}: allowed values: {', '.join(X_AXES)} (eval.plot_x)")
    low, high = f"{metric}/ci_low", f"{metric}/ci_high"
    series = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r[x], r[metric], r.get(low, math.nan), r.get(high, math.nan)) for r in rows
                        if r["model"] == model and metric in r)
        if points:
            series[model] = [np.array(v, dtype=np.float64) for v in zip(*points, strict=True)]
    plotted = np.concatenate([values for _, values, _, _ in series.values()] or [np.zeros(0)])
    scale = y_scale(plotted)
    floor = np.nanmin(plotted) / 10 if scale == "log" else -math.inf
    fig = Figure(figsize=(5, 3.4), dpi=100)
    ax = fig.add_subplot()
    for model, (xs, values, lows, highs) in series.items():
        line, = ax.plot(xs, values, marker="o", label=model)
        # vertical bars from low to high, not errorbar's +-yerr: FID's interval need not be symmetric (NaN: no bar)
        ax.vlines(xs, np.maximum(lows, floor), highs, color=line.get_color(), alpha=0.6, linewidth=2)
    ax.set_xscale("log", base=2)
    ax.set_yscale(scale)
    ax.set_xlabel(X_AXES[x])
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_metric(rows: list[dict], metric: str, path: Path, x: str = "steps") -> Path:
    """metric_figure as a PNG."""
    metric_figure(rows, metric, x).savefig(path)
    return path


MIN_TILE = 128  # smaller tiles (the 32 px demo) are enlarged by a whole factor, pixel for pixel, to at least this side
GAP = 4  # pixels between tiles


def steps_label(steps: int, nfe: int) -> str:
    return f"{steps} step{'' if steps == 1 else 's'} · NFE {nfe}"


def _fit(text: str, font, width: float) -> str:
    """text, cut to width with an ellipsis where it is wider."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text.rstrip() + "…"


def _wrap(text: str, font, width: float, max_lines: int) -> list[str]:
    """text in lines of at most width, at most max_lines of them (the last one ends in an ellipsis if cut)."""
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if font.getlength(joined) <= width or not lines[-1]:
            lines[-1] = joined
        else:
            lines.append(word)
    cut = len(lines) > max_lines
    lines = lines[:max(1, max_lines)]
    if cut:
        lines[-1] += "…"
    return [_fit(line, font, width) for line in lines]


def labelled_canvas(tile: tuple[int, int], row_labels: list[str],
                    column_labels: list[str]) -> tuple[Image.Image, int, int]:
    """A white grid canvas for tiles of tile = (height, width) pixels with the labels drawn in: each column's above
    it, each row's at its left (wrapped, then cut to the tile's height). Returns (canvas, top, left): where the first
    tile goes. The one label drawing of the PNG and the GIF grids (a GIF's frames all start from this canvas)."""
    h, w = tile
    font = ImageFont.load_default(size=max(12, round(max(h, w) / 10)))
    ascent, descent = font.getmetrics()
    line, pad = ascent + descent, max(2, font.size // 3)
    label_w = max(round(1.25 * w), 10 * font.size)
    top, left = line + 2 * pad, label_w + 2 * pad
    canvas = Image.new("RGB", (left + len(column_labels) * (w + GAP), top + len(row_labels) * (h + GAP)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, text in enumerate(column_labels):
        text = _fit(text, font, w)
        draw.text((left + c * (w + GAP) + (w - font.getlength(text)) / 2, pad), text, fill="#222", font=font)
    for r, text in enumerate(row_labels):
        lines = _wrap(text, font, label_w, h // line)
        y = top + r * (h + GAP) + (h - len(lines) * line) / 2
        for i, part in enumerate(lines):
            draw.text((pad, y + i * line), part, fill="#222", font=font)
    return canvas, top, left


def grid_frames(tiles: np.ndarray, row_labels: list[str], column_labels: list[str]) -> np.ndarray:
    """tiles (R * C, F, h, w, 3) uint8, row-major (F = 1 for images) -> the (F, H, W, 3) frames of one labelled grid;
    tiles smaller than MIN_TILE are enlarged by a whole factor with nearest-neighbour sampling."""
    n, _, h, w, _ = tiles.shape
    if n != len(row_labels) * len(column_labels):
        raise ValueError(f"{n} tiles for {len(row_labels)} row labels x {len(column_labels)} column labels")
    scale = max(1, -(-MIN_TILE // max(h, w)))
    tiles = tiles.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    canvas, top, left = labelled_canvas((h, w), row_labels, column_labels)
    frames = np.repeat(np.asarray(canvas)[None], tiles.shape[1], axis=0)
    for i in range(n):
        r, c = divmod(i, len(column_labels))
        y, x = top + r * (h + GAP), left + c * (w + GAP)
        frames[:, y:y + h, x:x + w] = tiles[i]
    return frames


def write_grids(tiles: dict, out: Path, rows: list[dict], grid_prompts: list[str]) -> dict[str, Path]:
    """One grid per model: a row per grid prompt (its text at the left), a column per step count, ascending (the
    steps and the NFE of that model's step-table row above it)."""
    nfe = {(r["model"], r["steps"]): r["nfe"] for r in rows}
    grids = {}
    out.mkdir(parents=True, exist_ok=True)
    for model in dict.fromkeys(k[0] for k in tiles):
        samples = sorted({i for m, i, _ in tiles if m == model})
        steps = sorted({K for m, _, K in tiles if m == model})
        images = np.stack([tiles[(model, i, K)] for i in samples for K in steps])
        clips = images.ndim == 5  # clips (F, H, W, 3) per tile: an animated grid, WebP (embedded) and GIF
        frames = grid_frames(images if clips else images[:, None], list(grid_prompts),
                             [steps_label(K, nfe[(model, K)]) for K in steps])
        if clips:
            write_gif(frames, out / f"{model}.gif")
            grids[model] = write_webp(frames, out / f"{model}.webp")
        else:
            grids[model] = out / f"{model}.png"
            Image.fromarray(frames[0]).save(grids[model])
    return grids


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    mime = {".gif": "image/gif", ".webp": "image/webp"}.get(path.suffix, "image/png")
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(path.stem)}">'


def write_html(path: Path, rows: list[dict], info: dict, plots: dict, grids: dict, grid_prompts: list[str],
               plot_x: str = "steps") -> None:
    columns = [*COLUMNS, *_present(rows)]
    table = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, c))}</td>" for c in columns) + "</tr>"
                    for r in rows)
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    prompt_list = "".join(f"<li>{html.escape(p)}</li>" for p in grid_prompts)
    body = [
        "<h1>PCM evaluation</h1>",
        "<p>Every row samples the same prompts from the same initial noises. fid: against the reference images; "
        "fid_teacher and trajectory_error: against the teacher's reference-step samples (DDIM; Euler on a flow "
        "teacher) (lower is better); "
        "step_consistency: cosine similarity of a model's results at different step counts (higher is more "
        "consistent). Video: fid over all frames, clip_score per frame averaged over the clip, frame_consistency: "
        "CLIP similarity of consecutive frames, frame_feature_consistency: the same with the FID features, "
        "oracle_motion: the captioned direction of motion read back.</p>",
        "<h2 id='steps'>Step table</h2>"
        + "".join(f"<p>{html.escape(line)}</p>" for line in table_header(info).split("\n\n")),
        f"<table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{table}</table>",
        f"<h2 id='plots'>Metrics against {X_AXES[plot_x]}</h2><p>Bars: the 95 % intervals.</p>",
        *(_img(p) for p in plots.values()),
        anchors_panel(rows, info),
        "<h2 id='samples'>Samples</h2><p>Each grid is labelled: the prompt left of each row, the step count and the "
        "NFE (network evaluations per sample; CFG &gt; 1 doubles them) over each column. Rows, top to bottom:</p>"
        f"<ol>{prompt_list}</ol><p>Columns: step counts, ascending.</p>",
        *(f"<h3>{html.escape(m)}</h3>{_img(p)}" for m, p in grids.items()),
        f"<h2 id='run'>Run</h2><table>{facts}</table>",
    ]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{margin:4px;max-width:100%}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>PCM evaluation</title>"
                    f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")


def _anchor_rows(rows: list[dict]) -> dict[str, dict[int, float]]:
    """{PCM row label: {steps: fid_teacher}}: our rows that the paper's FID-SD describes."""
    ours = {}
    for r in rows:
        if r["method"] == "pcm" and "fid_teacher" in r:
            ours.setdefault(r["model"], {})[r["steps"]] = r["fid_teacher"]
    return ours


def anchors_panel(rows: list[dict], info: dict) -> str:
    """The PCM paper's FID-SD at 1-16 steps for the teacher's family, ours beside it only when the family matches and
    N >= 30 000 (the paper's sets); otherwise the paper's alone, with why ours are not comparable."""
    family, n = info.get("teacher_family", ""), info.get("samples", 0)
    if family not in PAPER_FID_SD:
        families = ", ".join(PAPER_FID_SD)
        return (f"<h2>Anchors</h2><p>The PCM paper reports FID-SD for {families} teachers only; this teacher's family "
                f"is {html.escape(str(family))}: no anchors.</p>")
    teacher, dataset, values = PAPER_FID_SD[family]
    comparable = n >= PAPER_N
    ours = _anchor_rows(rows) if comparable else {}
    head = "".join(f"<th>{html.escape(label)} (ours, fid_teacher)</th>" for label in ours)
    body = "".join(f"<tr><td>{k}</td><td>{v:.2f}</td>" + "".join(f"<td>{_fmt(float(by_k[k]))}</td>" if k in by_k else
                                                               "<td></td>" for by_k in ours.values()) + "</tr>"
                   for k, v in zip(PAPER_STEPS, values, strict=True))
    note = (f"Ours (N = {n}) beside them: same teacher family and an evaluation set as large as the paper's; the "
            f"comparison also assumes our prompts are drawn like {dataset}." if comparable else
            f"Ours are not shown: N = {n} &lt; {PAPER_N:,}. FID is biased upward at small N, so our values are not "
            f"comparable with these (compare FIDs only at equal N).")
    return (f"<h2>Anchors</h2><p>The PCM paper's numbers on its data: FID-SD (FID against the teacher's own samples, "
            f"our fid_teacher) of PCM with {teacher} on {dataset}. {note}</p><table><tr><th>steps</th>"
            f"<th>paper FID-SD ({dataset})</th>{head}</tr>{body}</table>")


def write_report(out: Path, rows: list[dict], info: dict, tiles: dict, grid_prompts: list[str],
                 plot_x: str = "steps") -> dict:
    """Writes every output under out, the plots against plot_x (eval.plot_x); returns the summary (paths and the
    markdown table)."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    metrics = flat_metrics(rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_csv(rows, out / "steps.csv")
    table = markdown_table(rows, table_header(info))
    (out / "steps.md").write_text(table)
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    plots = {m: plot_metric(rows, m, out / "plots" / f"{m}.png", plot_x) for m in _present(rows)}
    grids = write_grids(tiles, out / "grids", rows, grid_prompts)
    write_html(out / "report.html", rows, info, plots, grids, grid_prompts, plot_x)
    return {"output_dir": str(out), "report": str(out / "report.html"), "metrics": str(out / "metrics.json"),
            "rows": len(rows), "table": table, **{k: info[k] for k in ("samples", "seconds")}}
