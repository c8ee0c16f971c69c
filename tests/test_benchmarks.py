"""The GPU benchmark's code path, run small on CPU (`--tiny`), and its refusal to run big without CUDA."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "sdxl_gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_runs_tiny_sdxl_with_and_without_the_adversarial_loss_and_sd3(tmp_path):
    out = tmp_path / "sdxl_gpu.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--batch", "2", "--steps", "2", "--rank", "4",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"pcm", "pcm + adv joint", "sd3 pcm"}
    for run in results["runs"].values():
        assert run["steps_per_s"] > 0 and run["last_loss"] == run["last_loss"]  # finite, not NaN


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown where there is no CUDA")
def test_sdxl_gpu_benchmark_says_so_without_cuda(tmp_path, capsys, monkeypatch):
    # in this process (a process of its own is ~8 s of imports): the test above runs the script as a script
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import sdxl_gpu

    sdxl_gpu.main(["--out", str(tmp_path / "x.json")])
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


def test_checkpoint_write_benchmark_saves_verifies_and_loads_a_tiny_checkpoint(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    from checkpoint_write import main

    result = main(["--tiny", "--rank", "4", "--dir", str(tmp_path), "--json", str(tmp_path / "r.json")])
    assert result["lora_params_millions"] > 0 and result["checkpoint_gb"] >= 0 and result["save_s"] >= 0
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert list(tmp_path.iterdir()) == [tmp_path / "r.json"]  # the checkpoint folder was removed
