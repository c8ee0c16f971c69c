"""benchmarks/loader_throughput.py on tiny settings: every format and worker count measured, the consumption
estimate from the real UNet configurations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_loader_benchmark_measures_every_format_and_estimates_what_8_gpus_consume(tmp_path):
    out = tmp_path / "loader.json"
    done = subprocess.run([sys.executable, "benchmarks/loader_throughput.py", "--images", "16", "--sides", "64",
                           "--workers", "0,1", "--seconds", "0.3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    assert set(results["loader"]) == {"png@64", "jpg@64", "latents@64"}
    assert all(rate > 0 for rates in results["loader"].values() for rate in rates.values())
    sd15 = results["consumption"]["64"]
    # SD1.5's UNet at 64 px (8x8 latents): a few hundred GFLOP per forward, 7 forwards per training sample
    assert sd15["unet"] == "sd15" and 0.05 < sd15["tflop_per_sample"] < 5
    assert sd15["samples_per_s_8gpu_at_100pct"] > sd15["samples_per_s_8gpu_at_40pct"] > 0
