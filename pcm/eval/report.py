"""The evaluation's outputs: metrics.json (flat, for `dvc metrics`), steps.csv (for `dvc plots`), steps.md, PNG plots
(each metric against steps, one line per model), sample grids (prompts x step counts; animated GIFs for video) and
one self-contained report.html (images embedded) that a Kubeflow HTML artifact can show."""

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


def _present(rows: list[dict]) -> list[str]:
    return [m for m in METRICS if any(m in r for r in rows)]


def flat_metrics(rows: list[dict]) -> dict[str, float]:
    """{'<model>/k<steps>/<metric>': value}: flat keys, so `dvc metrics diff` lines up rows across runs."""
    return {f"{r['model']}/k{r['steps']}/{m}": float(r[m]) for r in rows for m in _present(rows) if m in r}


def _fmt(value) -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = [*COLUMNS, *_present(rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    columns = [*COLUMNS, *_present(rows)]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_metric(rows: list[dict], metric: str, path: Path) -> Path:
    """metric against steps (log2 axis), one line per model; the better direction is in the title."""
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    for model in dict.fromkeys(r["model"] for r in rows):
        points = sorted((r["steps"], r[metric]) for r in rows if r["model"] == model and metric in r)
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=model)
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
    table = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c, '')))}</td>" for c in columns) + "</tr>"
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
        f"<h2>Step table</h2><table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{table}</table>",
        "<h2>Metrics against steps</h2>", *(_img(p) for p in plots.values()),
        f"<h2>Samples</h2><p>Rows, top to bottom:</p><ol>{prompt_list}</ol><p>Columns: step counts, ascending.</p>",
        *(f"<h3>{html.escape(m)}</h3>{_img(p)}" for m, p in grids.items()),
        f"<h2>Run</h2><table>{facts}</table>",
    ]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}img{margin:4px;max-width:100%}")
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>PCM evaluation</title>"
                    f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n", encoding="utf-8")


def write_report(out: Path, rows: list[dict], info: dict, tiles: dict, grid_prompts: list[str]) -> dict:
    """Writes every output under out; returns the summary (paths and the markdown table)."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    metrics = flat_metrics(rows)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_csv(rows, out / "steps.csv")
    table = markdown_table(rows)
    (out / "steps.md").write_text(table)
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    plots = {m: plot_metric(rows, m, out / "plots" / f"{m}.png") for m in _present(rows)}
    grids = write_grids(tiles, out / "grids")
    write_html(out / "report.html", rows, info, plots, grids, grid_prompts)
    return {"output_dir": str(out), "report": str(out / "report.html"), "metrics": str(out / "metrics.json"),
            "rows": len(rows), "table": table, **{k: info[k] for k in ("samples", "seconds")}}
