"""`make gpu-check` rehearsed on CPU (`--tiny`): a rare GPU loan must not be spent on a crash. Every part runs to
the end without a recorded error; the JSON and Markdown carry what the README's performance table is filled from; a
crash or a time cap ends only its part, keeping what it measured; a rerun of one part keeps the others; and without
CUDA the full-size check says so in one line and exits 0."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
PARTS = {"unet", "overhead", "precision", "demo"}


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_every_part_runs_tiny_on_cpu_and_writes_json_and_markdown(tmp_path):
    done = _run("--tiny", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    (found,) = tmp_path.glob("gpu-cpu-tiny-*.json")
    report = json.loads(found.read_text())
    assert {"card", "date", "torch", "cuda", "commit", "tiny", "parts", "budgets"} <= report.keys()
    assert set(report["parts"]) == PARTS
    for name, part in report["parts"].items():
        assert part["status"] == "ok" and part["error"] is None, (name, part["error"])
        assert part["seconds"] <= part["cap_s"]
    unet = report["parts"]["unet"]["results"]
    for row in ("sdxl", "sd15"):
        assert set(unet[row]["variants"]) == {"pcm small-cfg", "pcm + adv joint", "lcm",
                                              "pcm two-unet (reference layout)"}
        assert all(v["steps_per_s"] > 0 for v in unet[row]["variants"].values())
        assert unet[row]["floor"]["floor_s"] > 0
    overhead = report["parts"]["overhead"]["results"]
    assert overhead["eager"]["overhead_ratio"] > 0 and overhead["compiled"]["loss_matches_1e-3"] is True
    precision = report["parts"]["precision"]["results"]
    assert precision["bf16"]["resumed_ok"] and precision["bf16"]["steps_logged_after_resume"] == [3, 4]
    assert precision["fp16"].startswith("skipped") and precision["adamw8bit"].startswith("skipped")
    demo = report["parts"]["demo"]["results"]
    assert demo["completed"] == ["demo_data", "prepare", "demo_teacher", "distill", "evaluate"]
    assert set(report["budgets"]) == {"overhead_ratio", "one_over_two_unet_peak", "sdxl_step_over_floor",
                                      "host_syncs_per_step"}
    assert precision["host_syncs_per_step"].startswith("skipped")  # counted by CUDA's sync debug mode only
    for name in ("one_over_two_unet_peak", "host_syncs_per_step"):  # no GPU memory or CUDA syncs on CPU
        assert report["budgets"][name]["verdict"] == "not measured"
    summary = found.with_suffix(".md").read_text()
    assert "| budget |" in summary and all(f"## {name}: ok" in summary for name in PARTS)



@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the line shown where there is no CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path, capsys, monkeypatch):
    # in this process (a process of its own is ~8 s of imports): the --tiny test runs the script as a script
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import gpu_check

    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.strip().count("\n") == 0 and "no CUDA device" in out
    assert list(tmp_path.iterdir()) == []


def test_an_error_or_the_time_cap_ends_only_its_part_and_keeps_what_it_measured(tmp_path, monkeypatch):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    def crashes(run, out):
        out["measured"] = 1.0
        raise RuntimeError("CUDA out of memory")

    def hangs(run, out):
        out["measured"] = 2.0
        time.sleep(30)

    def fine(run, out):
        out["overhead"] = 1.0

    monkeypatch.setattr(gpu_check, "PARTS", {1: ("unet", crashes), 2: ("overhead", hangs), 3: ("precision", fine)})
    monkeypatch.setattr(gpu_check, "CAPS_S", {1: 5, 2: 0.5, 3: 5})
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the rest of this test session keeps its threads
    assert gpu_check.main(["--tiny", "--out", str(tmp_path), "--parts", "1,2,3"]) == 0
    (found,) = tmp_path.glob("gpu-*.json")
    parts = json.loads(found.read_text())["parts"]
    assert parts["unet"]["status"] == "error" and "out of memory" in parts["unet"]["error"]
    assert "RuntimeError" in parts["unet"]["traceback"] and parts["unet"]["results"] == {"measured": 1.0}
    assert parts["overhead"]["status"] == "capped" and parts["overhead"]["results"] == {"measured": 2.0}
    assert parts["overhead"]["seconds"] < 5
    assert parts["precision"]["status"] == "ok"

    monkeypatch.setitem(gpu_check.PARTS, 1, ("unet", fine))  # a rerun of the failed part: the others are kept
    assert gpu_check.main(["--tiny", "--out", str(tmp_path), "--parts", "1"]) == 0
    again = json.loads(found.read_text())["parts"]
    assert again["unet"]["status"] == "ok" and again["overhead"] == parts["overhead"]
    assert again["precision"] == parts["precision"]


def test_host_syncs_per_step_is_the_difference_of_a_long_and_a_short_run():
    sys.path.insert(0, str(SCRIPT.parent))
    import host_syncs

    syncs_of = {2: 11, 6: 15}  # start-up, checkpoint and export: 9; one per step
    runs = []

    def run_steps(n):
        runs.append(n)
        return n

    def counter(fn):
        return syncs_of[fn()]

    assert host_syncs.per_step(run_steps, 2, 6, counter) == 1.0 and sorted(runs) == [2, 6]
