"""benchmarks/claims_demo.py (issue 17 §5 on the demo world): a run on a tiny world writes every claim with its
interval, the small-CFG student provably ignores a negative prompt, and finished LoRAs are reused."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml
from worlds import distill_world

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "claims_demo.py"


def _module():
    spec = importlib.util.spec_from_file_location("claims_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_swap_colour_changes_exactly_the_colour_word():
    claims_demo = _module()
    assert claims_demo.swap_colour("a red circle in the center on a gray background") == \
        "a green circle in the center on a gray background"
    with pytest.raises(ValueError, match="no colour word"):
        claims_demo.swap_colour("a circle in the center")


@pytest.mark.slow
def test_a_run_on_a_tiny_world_reports_every_claim_and_reuses_its_loras(tmp_path, monkeypatch, fresh_accelerate_state):
    root, base = distill_world(tmp_path / "world", shards=2)
    (root / "params.yaml").write_text(yaml.safe_dump(base | {"eval": {"batch_size": 4}}))
    monkeypatch.chdir(tmp_path)  # main() moves into --root; monkeypatch restores the test's folder
    claims_demo = _module()
    out = claims_demo.main(["--root", str(root), "--seeds", "2", "--prompts", "5", "--out-dir",
                            str(tmp_path / "results"), "--quiet"])

    claims = out["claims"]
    assert json.loads((tmp_path / "results" / "claims-demo.json").read_text())["claims"] == claims
    for K in (1, 2, 4):
        assert claims[f"(a) K={K}: PCM M={K}"]["seeds"] == 2 and claims[f"teacher DDIM-{K}"]["seeds"] == 1
    for rule in ("substeps", "edge_renoise", "edges_only"):
        assert f"(e) PCM M=4, {rule}: K=16" in claims
    for st in claims.values():
        assert st["ci_low"] <= st["mean"] <= st["ci_high"]
    # the small-CFG student samples at CFG 1, where the negative condition is never evaluated: not one pixel moves
    still = claims["(d) small-CFG at CFG 1: pixel RMS moved by the negative prompt"]
    assert still["mean"] == still["ci_low"] == still["ci_high"] == 0
    assert claims["(d) normal-CFG at CFG 3: pixel RMS moved by the negative prompt"]["ci_low"] > 0
    assert "| (c) normal-CFG: oracle overall, CFG 3 - CFG 1 |" in (tmp_path / "results" / "claims-demo.md").read_text()

    start = time.perf_counter()  # every LoRA is finished: a second pass distills nothing
    loras = claims_demo.distill_seed(root / "params.yaml", root / "models" / "claims-demo", 1, False)
    assert time.perf_counter() - start < 1.0 and all((f / "pcm_config.json").is_file() for f in loras.values())
