"""The evaluation's outputs: metrics.json (flat, for `dvc metrics`), steps.csv (for `dvc plots`), steps.md, PNG plots
(each metric against steps, one line per model), sample grids (prompts x step counts; animated GIFs for video) and
one self-contained report.html (images embedded) that a Kubeflow HTML artifact can show.
A metric m with a 95 % interval (pcm.eval.intervals) has m/ci_low and m/ci_high beside it in every output: flat keys in
metrics.json, columns in steps.csv, "value [low, high]" in the tables, error bars in the plots. report.html also has
the anchors panel: the PCM paper's own FID-SD, beside ours only where the two are comparable."""

import base64
import csv
import html
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pcm.eval.video import write_gif  # noqa: E402
from pcm.train.validation import save_grid  # noqa: E402

LOWER_IS_BETTER = ("fid", "fid_teacher", "trajectory_error")
METRICS = ("fid", "fid_teacher", "trajectory_error", "step_consistency", "clip_score", "oracle_colour", "oracle_kind",
           "oracle_position", "oracle_background", "oracle_overall", "frame_consistency", "oracle_motion",
           "oracle_count")
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
    """The line above the step table: N, and what the brackets are."""
    n = f"N = {info['samples']} samples per row ({info['prompts']} prompts x {len(info['seeds'])} seeds)"
    if not info.get("bootstrap_resamples"):
        return f"{n}; no intervals (eval.bootstrap_resamples = 0)"
    return (f"{n}; [low, high]: 95 % interval, bootstrap over the {info['prompts']} prompts "
            f"({info['bootstrap_resamples']} resamples)")


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


def plot_metric(rows: list[dict], metric: str, path: Path) -> Path:
    """metric against steps (log2 axis), one line per model; the better direction is in the title."""
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    low, high = f"{metric}/ci_low", f"{metric}/ci_high"
    for model in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["steps"], r[metric], r.get(low, math.nan), r.get(high, math.nan)) for r in rows
                        if r["model"] == model and metric in r)
        if not points:
            continue
        steps, values, lows, highs = (np.array(x, dtype=np.float64) for x in zip(*points, strict=True))
        line, = ax.plot(steps, values, marker="o", label=model)
        # vertical bars from low to high, not errorbar's +-yerr: FID's interval need not be symmetric
        ax.vlines(steps, lows, highs, color=line.get_color(), alpha=0.6, linewidth=2)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_grids(tiles: dict, out: Path) -> dict[str, Path]:
    """One grid per model: a row per grid prompt, a column per step count (ascending)."""
    grids = {}
    for model in dict.fromkeys(k[0] for k in tiles):
        samples = sorted({i for m, i, _ in tiles if m == model})
        steps = sorted({K for m, _, K in tiles if m == model})
        images = np.stack([tiles[(model, i, K)] for i in samples for K in steps])
        if images.ndim == 5:  # clips (F, H, W, 3) per tile: an animated GIF grid
            grids[model] = write_gif(images, len(samples), out / f"{model}.gif")
            continue
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        grids[model] = save_grid(pixels, len(samples), out / f"{model}.png")
    return grids


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    mime = "image/gif" if path.suffix == ".gif" else "image/png"
    return f'<img src="data:{mime};base64,{data}" alt="{html.escape(path.stem)}">'


def write_html(path: Path, rows: list[dict], info: dict, plots: dict, grids: dict, grid_prompts: list[str]) -> None:
    columns = [*COLUMNS, *_present(rows)]
    table = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, c))}</td>" for c in columns) + "</tr>"
                    for r in rows)
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in info.items())
    prompt_list = "".join(f"<li>{html.escape(p)}</li>" for p in grid_prompts)
    body = [
        "<h1>PCM evaluation</h1>",
        "<p>Every row samples the same prompts from the same initial noises. fid: against the reference images; "
        "fid_teacher and trajectory_error: against the teacher's reference-step DDIM samples (lower is better); "
        "step_consistency: cosine similarity of a model's results at different step counts (higher is more "
        "consistent). Video: fid over all frames, clip_score per frame averaged over the clip, frame_consistency: "
        "CLIP similarity of consecutive frames, oracle_motion: the captioned direction of motion read back.</p>",
        f"<h2>Step table</h2><p>{html.escape(table_header(info))}</p>",
        f"<table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{table}</table>",
        "<h2>Metrics against steps</h2><p>Bars: the 95 % intervals.</p>", *(_img(p) for p in plots.values()),
        anchors_panel(rows, info),
        f"<h2>Samples</h2><p>Rows, top to bottom:</p><ol>{prompt_list}</ol><p>Columns: step counts, ascending.</p>",
        *(f"<h3>{html.escape(m)}</h3>{_img(p)}" for m, p in grids.items()),
        f"<h2>Run</h2><table>{facts}</table>",
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


def write_report(out: Path, rows: list[dict], info: dict, tiles: dict, grid_prompts: list[str]) -> dict:
    """Writes every output under out; returns the summary (paths and the markdown table)."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    metrics = flat_metrics(rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_csv(rows, out / "steps.csv")
    table = markdown_table(rows, table_header(info))
    (out / "steps.md").write_text(table)
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    plots = {m: plot_metric(rows, m, out / "plots" / f"{m}.png") for m in _present(rows)}
    grids = write_grids(tiles, out / "grids")
    write_html(out / "report.html", rows, info, plots, grids, grid_prompts)
    return {"output_dir": str(out), "report": str(out / "report.html"), "metrics": str(out / "metrics.json"),
            "rows": len(rows), "table": table, **{k: info[k] for k in ("samples", "seconds")}}
