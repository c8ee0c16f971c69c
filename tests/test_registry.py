"""`pcm register` / `pcm sample` against the embedded SQLite store and a real `mlflow server` process; the checks on
the LoRA file (it loads onto its base, the gate's metrics are its own, a loaded version is the file it recorded),
with damaged files injected: truncated, made for a wider base, half renamed, changed after registration."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from worlds import tiny_world

from pcm import stages
from pcm.cli import main
from pcm.config import config_from_dict
from pcm.inference import LoRAError, lora_sha256
from pcm.models.lora import DIFFUSERS_FILE
from pcm.registry import SHA_TAG, RegistryError, load_registered, tracking_store

PROMPT = "a red circle at the top left on a gray background"


pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return root, tiny_world(root, ("pcm",))


def _variant(lora: Path, out: Path, scale: float) -> Path:
    """A copy of an exported LoRA folder with its B matrices scaled: another LoRA (another file digest)."""
    shutil.copytree(lora, out)
    with safe_open(lora / DIFFUSERS_FILE, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v * scale if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, str(out / DIFFUSERS_FILE), metadata=metadata)
    return out


def _cfg(base, tmp_path, uri, lora, metric_value, evaluated=True, **register):
    """Config registering lora with an evaluation of it (metrics.json, and info.json recording the file's sha256 for
    the gate's row, as pcm evaluate writes them); evaluated: the sha256 to record (True: lora's own, False: none)."""
    folder = tmp_path / f"eval-{metric_value}-{Path(lora).parent.name}-{evaluated}"[:80]
    folder.mkdir(parents=True, exist_ok=True)
    metrics = folder / "metrics.json"
    metrics.write_text(json.dumps({"pcm-M2/k2/fid_teacher": metric_value, "pcm-M2/k2/trajectory_error": 0.3}))
    if evaluated:
        sha = lora_sha256(lora) if evaluated is True else evaluated
        (folder / "info.json").write_text(json.dumps({"loras": [str(lora)], "lora_sha256": {"pcm-M2": sha}}))
    return config_from_dict({**base, "tracking": {"uri": uri, "experiment": "registry-test"},
                             "register": {"lora": str(lora), "model_name": "tiny-pcm", "eval_metrics": str(metrics),
                                          "gate_metric": "pcm-M2/k2/fid_teacher", "gate_threshold": 100.0,
                                          "output": str(tmp_path / "registered.json"), **register}})


def _decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _same_as_direct(cfg, uri_of_model, lora, tmp_path):
    """The registered model and the direct path produce the same image, bit for bit."""
    model = load_registered(cfg, uri_of_model)
    png = model.predict(pd.DataFrame({"prompt": [PROMPT], "seed": [3], "steps": [2]}))["image"][0]
    direct = stages.sample(cfg, [PROMPT], str(tmp_path / "direct.png"), lora=str(lora), steps=2, seed=3)
    assert np.array_equal(_decode(png), _decode(Path(direct["images"][0]).read_bytes()))
    assert _decode(png).shape == (16, 16, 3)


def test_register_tags_card_load_by_alias_and_an_idempotent_rerun(world, tmp_path):
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    cfg = _cfg(base, tmp_path, uri, lora, 50.0)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    first = stages.register(cfg)
    assert os.environ.get("MLFLOW_TRACKING_URI") == before  # the store of this call does not leak into the process
    assert first["created"] and first["version"] == 1 and first["aliases"] == ["candidate", "champion"]
    client = MlflowClient(uri)
    version = client.get_model_version("tiny-pcm", "1")
    tags = version.tags
    assert tags["pcm.family"] == "sd15" and tags["pcm.phases"] == "2" and tags["pcm.N"] == "20"
    assert json.loads(tags["pcm.edges"]) == [0, 499] and tags["pcm.recommended_steps"] == "2"
    assert tags["eval.k2/fid_teacher"] == "50.0" and tags["pcm.gate"].startswith("promoted")
    assert tags["pcm.git_commit"] and tags["pcm.params_hash"]
    assert "load_lora_weights" in version.description and "TCDScheduler" in version.description
    _same_as_direct(cfg, "models:/tiny-pcm@champion", lora, tmp_path)
    # the same LoRA again: no second version
    again = stages.register(cfg)
    assert not again["created"] and again["version"] == 1 and again["aliases"] == ["candidate", "champion"]
    assert len(client.search_model_versions("name='tiny-pcm'")) == 1
    # the LoRA in the mlflow.diffusers flavor, in the same run
    with tracking_store(uri):
        adapter = mlflow.diffusers.load_model(f"runs:/{version.run_id}/diffusers-lora")
    assert Path(adapter.base_model) == Path(base["teacher"]["model"]).resolve()
    pipe = adapter.load_pipeline(device="cpu")
    assert pipe.unet.peft_config


@pytest.mark.slow
def test_the_gate_promotes_refuses_and_moves_the_champion(world, tmp_path):
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    outcomes = []
    for i, value in enumerate([150.0, 60.0, 80.0, 40.0]):  # misses the threshold, first champion, worse, better
        variant = _variant(lora, tmp_path / f"v{i}" / "lora", 1.0 + 0.1 * i)
        result = stages.register(_cfg(base, tmp_path, uri, variant, value))
        outcomes.append((result["version"], result["promoted"], result["aliases"]))
    assert outcomes == [(1, False, ["candidate"]), (2, True, ["candidate", "champion"]), (3, False, ["candidate"]),
                        (4, True, ["candidate", "champion"])]
    client = MlflowClient(uri)
    assert "misses the threshold" in client.get_model_version("tiny-pcm", "1").tags["pcm.gate"]
    assert "worse than champion v2" in client.get_model_version("tiny-pcm", "3").tags["pcm.gate"]
    assert str(client.get_model_version_by_alias("tiny-pcm", "champion").version) == "4"
    higher = stages.register(_cfg(base, tmp_path, uri, _variant(lora, tmp_path / "h" / "lora", 2.0), 10.0,
                                  gate_direction="higher"))
    assert not higher["promoted"] and "misses the threshold" in higher["gate"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(folder: Path, port: int) -> subprocess.Popen:
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder}/server.db", "--artifacts-destination", str(folder / "artifacts"),
         "--allowed-hosts", f"127.0.0.1:{port},localhost:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # its 7 job-runner processes: ~20 s of CPU
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200:
                return process
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError("mlflow server did not start within 60 s")


def _stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, 15)
    process.wait(timeout=30)


@pytest.mark.slow
def test_a_real_server_and_one_that_is_down(world, tmp_path, capsys):
    """Registering against a server that is down is one line and changes nothing; once it is up (one start: each
    costs ~15 s of CPU), the same command registers, and a registration through it loads like the direct path."""
    root, base = world
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    lora = root / "pcm" / "lora"
    second = _variant(lora, tmp_path / "second" / "lora", 1.5)
    params = tmp_path / "params.yaml"
    cfg_down = _cfg(base, tmp_path, uri, second, 40.0)
    params.write_text(yaml.safe_dump({**base, "tracking": {"uri": uri, "experiment": "registry-test"},
                                      "register": {"lora": str(second), "model_name": "tiny-pcm",
                                                   "eval_metrics": cfg_down.register.eval_metrics,
                                                   "gate_metric": "pcm-M2/k2/fid_teacher",
                                                   "output": str(tmp_path / "registered.json")}}))
    assert main(["register", "--params", str(params)]) == 2  # nothing listens yet: one line, exit 2
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow tracking store at {uri}" in err and "unchanged on disk" in err
    assert (second / DIFFUSERS_FILE).is_file() and Path(cfg_down.register.eval_metrics).is_file()
    assert not (tmp_path / "registered.json").exists()
    server = _start_server(tmp_path, port)
    try:
        cfg = _cfg(base, tmp_path, uri, lora, 50.0)
        assert stages.register(cfg)["aliases"] == ["candidate", "champion"]
        _same_as_direct(cfg, "models:/tiny-pcm@champion", lora, tmp_path)
        assert main(["register", "--params", str(params)]) == 0  # the refused command, now that the server is up
        assert str(MlflowClient(uri).get_model_version_by_alias("tiny-pcm", "champion").version) == "2"
    finally:
        _stop(server)


def _rewrite(lora: Path, out: Path, change) -> Path:
    """A copy of a LoRA folder whose tensors went through change(dict) -> dict (metadata kept)."""
    shutil.copytree(lora, out)
    with safe_open(lora / DIFFUSERS_FILE, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(change(tensors), str(out / DIFFUSERS_FILE), metadata=metadata)
    return out


def _truncated(lora: Path, out: Path) -> Path:
    shutil.copytree(lora, out)
    data = (out / DIFFUSERS_FILE).read_bytes()
    (out / DIFFUSERS_FILE).write_bytes(data[:len(data) // 2])  # a copy cut off halfway
    return out


def _wider_base(tensors: dict) -> dict:
    """The LoRA of a base whose layers are twice as wide: every lora_A reads twice the input features."""
    return {k: torch.cat([v, v], dim=1) if "lora_A" in k else v for k, v in tensors.items()}


def _half_renamed(tensors: dict) -> dict:
    """The LoRA of a base with other block names: diffusers loads the rest and only warns."""
    return {k.replace("down_blocks.0.", "down_blocks.7.") if "lora_A" in k else k: v for k, v in tensors.items()}


@pytest.mark.parametrize("damage", ["truncated", "wider_base", "half_renamed"])
def test_a_lora_that_does_not_load_onto_its_base_is_refused_and_nothing_is_registered(world, tmp_path, damage):
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    out = tmp_path / damage / "lora"
    bad = _truncated(lora, out) if damage == "truncated" else _rewrite(
        lora, out, _wider_base if damage == "wider_base" else _half_renamed)
    with pytest.raises(LoRAError) as refused:
        stages.register(_cfg(base, tmp_path, uri, bad, 50.0))
    message = str(refused.value)
    assert "\n" not in message and f"register.lora={bad / DIFFUSERS_FILE}" in message and "pcm distill" in message
    assert MlflowClient(uri).search_registered_models() == [] and not (tmp_path / "registered.json").exists()


def test_the_gate_reads_only_metrics_measured_on_this_very_file(world, tmp_path):
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    other = "0" * 64
    cfg = _cfg(base, tmp_path, uri, lora, 50.0, evaluated=other)  # an evaluation of another LoRA file
    with pytest.raises(RegistryError) as refused:
        stages.register(cfg)
    message = str(refused.value)
    assert "\n" not in message and cfg.register.eval_metrics in message and other in message
    assert lora_sha256(lora) in message and "pcm evaluate" in message
    assert MlflowClient(uri).search_registered_models() == []
    # an evaluation that records no sha256 (older, or hand-written): registered as a candidate, never champion
    result = stages.register(_cfg(base, tmp_path, uri, lora, 50.0, evaluated=False))
    assert result["created"] and not result["promoted"] and result["aliases"] == ["candidate"]
    assert "records no sha256" in result["gate"]
    tags = MlflowClient(uri).get_model_version("tiny-pcm", "1").tags
    assert tags[SHA_TAG] == lora_sha256(lora) and not any(k.startswith("eval.") for k in tags)


def test_evaluate_records_each_lora_file_and_register_gates_on_it(world, tmp_path):
    """The real pcm evaluate writes the sha256 that pcm register then checks (smallest settings)."""
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    evaluation = {"loras": [str(lora)], "num_prompts": 2, "seeds": [0], "steps": [2], "reference_steps": 2,
                  "batch_size": 2, "num_reference": 8, "shapes_net_steps": 2, "grid_prompts": 1, "oracle": False,
                  "output_dir": str(tmp_path / "eval"), "cache_dir": str(tmp_path / "cache")}
    stages.evaluate(config_from_dict({**base, "eval": evaluation}), progress=False)
    info = json.loads((tmp_path / "eval" / "info.json").read_text())
    assert info["lora_sha256"] == {"pcm-M2": lora_sha256(lora)}
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values())  # still flat numbers for dvc and Kubeflow
    register = {"lora": str(lora), "model_name": "tiny-pcm", "eval_metrics": str(tmp_path / "eval" / "metrics.json"),
                "gate_metric": "pcm-M2/k2/fid_teacher", "gate_threshold": 1e9, "output": str(tmp_path / "r.json")}
    tracking = {"uri": uri, "experiment": "registry-test"}
    result = stages.register(config_from_dict({**base, "tracking": tracking, "register": register}))
    assert result["promoted"] and result["aliases"] == ["candidate", "champion"]
    tags = MlflowClient(uri).get_model_version("tiny-pcm", "1").tags
    assert float(tags["pcm.gate_value"]) == metrics["pcm-M2/k2/fid_teacher"]
    variant = _variant(lora, tmp_path / "retrained" / "lora", 1.5)  # another file, the same evaluation
    with pytest.raises(RegistryError, match="was measured on a LoRA file with sha256"):
        stages.register(config_from_dict({**base, "tracking": tracking, "register": {**register,
                                                                                      "lora": str(variant)}}))


def test_loading_a_version_refuses_a_lora_file_that_is_not_the_recorded_one(world, tmp_path):
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    cfg = _cfg(base, tmp_path, uri, lora, 50.0)
    stages.register(cfg)
    client = MlflowClient(uri)
    sha = lora_sha256(lora)
    # the registry's record differs from the artifact (another sha256 tag on the version)
    client.set_model_version_tag("tiny-pcm", "1", SHA_TAG, "f" * 64)
    with pytest.raises(RegistryError, match=f"records sha256 {'f' * 64}.*its artifact has {sha}"):
        load_registered(cfg, "models:/tiny-pcm@champion")
    client.set_model_version_tag("tiny-pcm", "1", SHA_TAG, sha)
    # the artifact itself changed after registration (its model_config still records the original sha256)
    stored = [p for p in (tmp_path / "artifacts").rglob(DIFFUSERS_FILE) if p.parent.name == "lora"]
    assert len(stored) == 1
    stored[0].write_bytes(stored[0].read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(RegistryError) as refused:
        load_registered(cfg, "models:/tiny-pcm/1")
    message = str(refused.value)
    assert "\n" not in message and f"records {sha}" in message and "register it again" in message
