"""`pcm evaluate` end to end on a tiny teacher with a PCM and an LCM LoRA: rows, outputs, cache, bad inputs."""

import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from builders import CAPTIONS
from worlds import tiny_world

from pcm import stages
from pcm.cli import main
from pcm.config import config_from_dict
from pcm.eval import report
from pcm.models.tiny import save_tiny_clip

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shapes data, a tiny SD1.5 teacher, a PCM (M = 2) and an LCM LoRA after 2 steps each, a tiny CLIP."""
    root = tmp_path_factory.mktemp("evaluate")
    base = tiny_world(root, ("pcm", "lcm"))
    base["eval"] = {"loras": [str(root / "pcm" / "lora"), str(root / "lcm" / "lora")], "num_prompts": 3,
                    "seeds": [0, 1], "steps": [1, 4], "reference_steps": 4, "batch_size": 4, "num_reference": 12,
                    "shapes_net_steps": 10, "grid_prompts": 2, "bootstrap_resamples": 200,
                    "clip_model": str(save_tiny_clip(root / "clip", CAPTIONS))}
    return root, base


def _cfg(base, tmp_path, **eval_overrides):
    e = {**base["eval"], "output_dir": str(tmp_path / "report"), "cache_dir": str(tmp_path / "cache"),
         **eval_overrides}
    return config_from_dict({**base, "eval": e})


@pytest.mark.slow
def test_report_rows_outputs_and_the_teacher_cache(world, tmp_path):
    root, base = world
    cfg = _cfg(base, tmp_path)
    summary = stages.evaluate(cfg, progress=False)
    out = Path(summary["output_dir"])
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert [(r["model"], int(r["steps"])) for r in rows] == [
        ("teacher-ddim", 1), ("teacher-ddim", 4), ("pcm-M2", 1), ("pcm-M2", 4), ("lcm", 1), ("lcm", 4),
        ("teacher-ddim", 4)]  # the last: the reference row (eval.reference_steps)
    assert all(int(r["samples"]) == 6 for r in rows)
    by_key = {(r["model"], int(r["steps"]), r["nfe"]): r for r in rows}
    # eval.reference_steps = 4 is also a teacher row: generated in another pass over the same noises and prompts, it
    # must land exactly on the cached reference
    teacher_4 = by_key[("teacher-ddim", 4, "8")]
    assert float(teacher_4["trajectory_error"]) == 0.0 and float(teacher_4["fid_teacher"]) < 1e-6
    assert float(by_key[("pcm-M2", 1, "1")]["trajectory_error"]) > 0
    for r in rows:
        assert 0 <= float(r["clip_score"]) <= 100 and 0 <= float(r["oracle_overall"]) <= 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pcm-M2/k4/fid_teacher"] == pytest.approx(float(by_key[("pcm-M2", 4, "4")]["fid_teacher"]),
                                                             rel=1e-5)
    assert all(isinstance(v, float) for v in metrics.values())  # flat: `dvc metrics show` reads it as is
    _check_intervals(rows, metrics, out)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list((out / "plots").glob("*.png"))) + 3  # + 3 grids
    assert {p.name for p in (out / "grids").iterdir()} == {"teacher-ddim.png", "pcm-M2.png", "lcm.png"}
    assert "| pcm-M2 | pcm |" in (out / "steps.md").read_text()
    info = json.loads((out / "info.json").read_text())
    assert info["teacher_reference_cached"] is False and info["samples"] == 6

    again = stages.evaluate(_cfg(base, tmp_path, output_dir=str(tmp_path / "report2")), progress=False)
    assert json.loads((Path(again["output_dir"]) / "info.json").read_text())["teacher_reference_cached"] is True
    # the same numbers; FID against the cached reference statistics differs by round-off only (sums rebuilt from the
    # stored mean and covariance)
    assert json.loads((Path(again["output_dir"]) / "metrics.json").read_text()) == pytest.approx(metrics, rel=1e-8)
    changed = stages.evaluate(_cfg(base, tmp_path, output_dir=str(tmp_path / "r3"), seeds=[0, 2]), progress=False)
    assert json.loads((Path(changed["output_dir"]) / "info.json").read_text())["teacher_reference_cached"] is False


def _check_intervals(rows: list[dict], metrics: dict, out: Path) -> None:
    """Every metric of every row has ci_low <= value <= ci_high beside it; the other keys are the old ones."""
    metric_names = [c for c in rows[0] if c not in report.COLUMNS and "/ci_" not in c]
    point_keys = {f"{r['model']}/k{r['steps']}/{m}" for r in rows for m in metric_names}
    assert {k for k in metrics if "/ci_" not in k} == point_keys
    for key in point_keys:
        low, high = metrics[f"{key}/ci_low"], metrics[f"{key}/ci_high"]
        assert low - 1e-9 <= metrics[key] <= high + 1e-9, key
    assert metrics["teacher-ddim/k4/trajectory_error/ci_high"] == 0.0  # the reference row against itself
    assert "N = 6 samples per row (3 prompts x 2 seeds)" in (out / "steps.md").read_text()
    assert re.search(r"\| pcm-M2 \| pcm \| 1 \| 4 \| 4 \| 6 \| [0-9.e+-]+ \[[0-9.e+-]+, [0-9.e+-]+\] \|",
                     (out / "steps.md").read_text())
    html = (out / "report.html").read_text()
    assert "<h2>Anchors</h2>" in html and "N = 6 &lt; 30,000" in html and "8.27" in html
    info = json.loads((out / "info.json").read_text())
    assert info["bootstrap_resamples"] == 200 and info["teacher_family"] == "sd15" and info["bootstrap_seconds"] > 0


def test_prompt_file_lines_that_are_empty_or_not_utf8_are_skipped_and_counted(world, tmp_path):
    root, base = world
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle in the center on a gray background\n\n   \n\xff\xfe broken\n"
                        b"a blue square at the top left on a white background\n")
    cfg = _cfg(base, tmp_path, prompts=str(prompts), loras=[base["eval"]["loras"][0]], steps=[1], seeds=[0],
               clip_model="", bootstrap_resamples=0)
    out = Path(stages.evaluate(cfg, progress=False)["output_dir"])
    info = json.loads((out / "info.json").read_text())
    assert info["prompts"] == 2 and info["skipped_prompt_lines"] == {"empty": 2, "not_utf8": 1}
    assert "clip_score" not in (out / "steps.csv").read_text()
    # eval.bootstrap_resamples = 0: no intervals anywhere, and the table says so
    assert not any("/ci_" in k for k in json.loads((out / "metrics.json").read_text()))
    assert "no intervals (eval.bootstrap_resamples = 0)" in (out / "steps.md").read_text()


def _row(model: str, steps: int, value: float, method: str = "pcm", low: float = 1.0, high: float = 3.0) -> dict:
    return {"model": model, "method": method, "guidance_scale": 1.0, "steps": steps, "nfe": steps, "samples": 4,
            "fid_teacher": value, "fid_teacher/ci_low": low, "fid_teacher/ci_high": high}


def test_intervals_in_the_flat_metrics_the_tables_and_the_plots(tmp_path):
    rows = [_row("pcm-M4", 1, 2.0), _row("pcm-M4", 4, 1.5, low=float("nan"), high=float("nan"))]
    assert report.flat_metrics(rows) == pytest.approx({
        "pcm-M4/k1/fid_teacher": 2.0, "pcm-M4/k1/fid_teacher/ci_low": 1.0, "pcm-M4/k1/fid_teacher/ci_high": 3.0,
        "pcm-M4/k4/fid_teacher": 1.5, "pcm-M4/k4/fid_teacher/ci_low": float("nan"),
        "pcm-M4/k4/fid_teacher/ci_high": float("nan")}, nan_ok=True)
    table = report.markdown_table(rows, "N = 4")
    assert table.startswith("N = 4\n") and "| 2 [1, 3] |" in table and "| 1.5 [n/a] |" in table  # n/a: 1 prompt
    report.write_csv(rows, tmp_path / "steps.csv")
    assert next(csv.reader(open(tmp_path / "steps.csv")))[-3:] == ["fid_teacher", "fid_teacher/ci_low",
                                                                     "fid_teacher/ci_high"]
    assert report.plot_metric(rows, "fid_teacher", tmp_path / "p.png").stat().st_size > 0  # NaN bars: none drawn


@pytest.mark.parametrize("family,samples,shown,says", [
    ("sd15", 200, False, "not comparable"),
    ("sd15", 30_000, True, "COCO-30K"),
    ("sdxl", 30_000, True, "CC12M-30K"),
    ("animatediff", 30_000, False, "no anchors"),
])
def test_the_anchors_panel_shows_ours_only_when_comparable(family, samples, shown, says):
    rows = [_row("pcm-M4", k, 0.5 + k) for k in (1, 2, 4)] + [_row("teacher-ddim", 4, 99.0, method="ddim")]
    panel = report.anchors_panel(rows, {"teacher_family": family, "samples": samples})
    assert says in panel and ("pcm-M4 (ours, fid_teacher)" in panel) == shown
    assert "99" not in panel  # the teacher's rows are not what the paper's PCM numbers describe
    if family in report.PAPER_FID_SD:
        assert "The PCM paper's numbers on its data" in panel
        assert all(f"{v:.2f}" in panel for v in report.PAPER_FID_SD[family][2])
    if shown:
        assert "<td>4.5</td>" in panel  # ours at 4 steps beside the paper's


@pytest.mark.parametrize("override,message", [
    ("eval.loras=['{root}/nowhere']", "eval.loras=.*nowhere: no pcm_config.json"),
    ("eval.clip_model={root}/no-clip", "eval.clip_model=.*no-clip"),
    ("eval.prompts={root}/no-prompts.txt", "eval.prompts=.*no-prompts.txt"),
])
def test_missing_inputs_fail_at_start_with_the_key(world, tmp_path, capsys, override, message):
    root, base = world
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**base, "eval": {**base["eval"], "cache_dir": str(tmp_path / "cache")}}))
    assert main(["evaluate", "--params", str(params), override.format(root=root)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "cache").exists()  # failed before any work


def test_the_shapes_feature_net_is_trained_once_then_read_from_the_cache(world, tmp_path, monkeypatch):
    from pcm.demo import features

    root, base = world
    net, key = features.cached_shapes_net(root / "prepared", tmp_path, steps=5, seed=0, progress=False)
    monkeypatch.setattr(features, "train_shapes_net", lambda *a, **k: pytest.fail("trained again"))
    again, same_key = features.cached_shapes_net(root / "prepared", tmp_path, steps=5, seed=0, progress=False)
    assert same_key == key and (tmp_path / f"shapes-net-{key}.safetensors").is_file()
    for a, b in zip(net.state_dict().values(), again.state_dict().values(), strict=True):
        assert bool((a == b).all())
    with pytest.raises(pytest.fail.Exception, match="trained again"):  # other settings: another key, a new net
        features.cached_shapes_net(root / "prepared", tmp_path, steps=6, seed=0, progress=False)


@pytest.mark.slow
def test_inception_features_from_converted_weights(world, tmp_path):
    """eval.features=inception: the FID Inception (random weights here) from a converted safetensors file."""
    import torch

    from pcm.eval.inception import FIDInception, convert_weights

    root, base = world
    torch.manual_seed(0)
    torch.save(FIDInception().state_dict(), tmp_path / "pt_inception.pth")
    weights = convert_weights(tmp_path / "pt_inception.pth", tmp_path / "inception.safetensors")
    cfg = _cfg(base, tmp_path, features="inception", inception_weights=str(weights), loras=[base["eval"]["loras"][0]],
               steps=[2], num_prompts=2, seeds=[0], num_reference=4, clip_model="", oracle=False)
    out = Path(stages.evaluate(cfg, progress=False)["output_dir"])
    info = json.loads((out / "info.json").read_text())
    assert info["features"] == "inception" and info["reference_images"] == 4
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert len(rows) == 3 and all(float(r["fid"]) > 0 for r in rows)
    assert not any(k.startswith("oracle") for k in rows[0])


def test_an_unset_model_reference_has_no_files(tmp_path, monkeypatch):
    from pcm.data.digest import model_files

    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert model_files("") == []  # Path("") is the working directory: an unset teacher.vae must not hash it
    assert model_files(".") == [Path("weights.bin")]
