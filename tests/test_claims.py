"""benchmarks/claims.py (issue 17 §5): its intervals, and a --quick run end to end with the claims that hold even
at quick settings (the rest are only checked for shape: at 200 training steps they are not yet meaningful)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "claims.py"


def _claims():
    spec = importlib.util.spec_from_file_location("claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_two_level_bootstrap_covers_seed_variance():
    claims = _claims()
    gen = torch.Generator().manual_seed(0)
    samples = torch.randn(3, 500, generator=gen, dtype=torch.float64)
    mean, lo, hi = claims.bootstrap([samples[0]])
    half_t = 1.96 * float(samples[0].std()) / 500**0.5  # one seed: the bootstrap is close to the t-interval
    assert lo < mean < hi and abs((hi - lo) / 2 - half_t) < 0.2 * half_t
    _, lo_same, hi_same = claims.bootstrap(list(samples))
    _, lo_apart, hi_apart = claims.bootstrap([s + shift for s, shift in zip(samples, (-1.0, 0.0, 1.0), strict=True)])
    assert hi_apart - lo_apart > 3 * (hi_same - lo_same)  # seeds that disagree widen the interval


def _stat_ok(s: dict) -> bool:
    return s["ci_low"] <= s["mean"] <= s["ci_high"]


@pytest.mark.slow
def test_quick_run_writes_every_claim_and_the_robust_ones_hold(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "claims.json").read_text())
    assert "| claim | measured | holds |" in (tmp_path / "claims.md").read_text()
    assert [r["K"] for r in result["a"]["rows"]] == [1, 2, 4] and [r["K"] for r in result["b"]["rows"]] == [1, 2, 4, 8]
    for r in result["a"]["rows"]:
        assert _stat_ok(r["teacher_minus_pcm"]) and r["teacher_minus_pcm"]["seeds"] == 2
    cells = {(r["model"], r["rule"], r["K"]): r["error"] for r in result["e"]["rows"]}
    rules = ("substeps", "edge_renoise", "edges_only")
    expected = {(f"PCM M={M}", rule, K) for M in (1, 2, 4) for rule in rules for K in (4, 8, 16) if K > M}
    assert expected <= set(cells) and all(_stat_ok(s) for s in cells.values())
    # robust even after 200 steps: the student starts as the teacher, so these are the teacher's structure
    assert all(r["holds"] for r in result["a"]["rows"] if r["K"] <= 2)  # one or two DDIM steps are far off
    assert all(r["holds"] for r in result["b"]["rows"] if r["K"] >= 2)  # LCM re-noises at every step
    assert result["c"]["holds_small_saturates"] and result["d"]["holds"]
    for (model, rule, K), s in cells.items():  # fresh noise inside a phase leaves the ODE's endpoint
        if rule == "edge_renoise":
            assert s["ci_low"] > cells[(model, "substeps", K)]["ci_high"]
