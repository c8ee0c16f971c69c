"""`pcm register` / `pcm sample` against the embedded SQLite store and a real `mlflow server` process."""

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
import yaml
from mlflow import MlflowClient
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from pcm import stages
from pcm.cli import main
from pcm.config import config_from_dict
from pcm.models.lora import DIFFUSERS_FILE
from pcm.registry import load_registered, tracking_store

sys.path.insert(0, str(Path(__file__).parent))
from worlds import tiny_world  # noqa: E402

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


def _cfg(base, tmp_path, uri, lora, metric_value, **register):
    metrics = tmp_path / f"metrics-{metric_value}.json"
    metrics.write_text(json.dumps({"pcm-M2/k2/fid_teacher": metric_value, "pcm-M2/k2/trajectory_error": 0.3}))
    return config_from_dict({**base, "tracking": {"uri": uri, "experiment": "registry-test"},
                             "register": {"lora": str(lora), "model_name": "tiny-pcm", "eval_metrics": str(metrics),
                                          "gate_metric": "pcm-M2/k2/fid_teacher", "gate_threshold": 100.0,
                                          **register}})


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
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=folder, start_new_session=True)
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


def test_a_real_server_and_one_that_is_down(world, tmp_path, capsys):
    root, base = world
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_server(tmp_path, port)
    try:
        lora = root / "pcm" / "lora"
        cfg = _cfg(base, tmp_path, uri, lora, 50.0)
        assert stages.register(cfg)["aliases"] == ["candidate", "champion"]
        _same_as_direct(cfg, "models:/tiny-pcm@champion", lora, tmp_path)
    finally:
        _stop(server)
    second = _variant(lora, tmp_path / "second" / "lora", 1.5)
    params = tmp_path / "params.yaml"
    cfg_down = _cfg(base, tmp_path, uri, second, 40.0)
    params.write_text(yaml.safe_dump({**base, "tracking": {"uri": uri, "experiment": "registry-test"},
                                      "register": {"lora": str(second), "model_name": "tiny-pcm",
                                                   "eval_metrics": cfg_down.register.eval_metrics,
                                                   "gate_metric": "pcm-M2/k2/fid_teacher"}}))
    assert main(["register", "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert f"cannot reach the MLflow tracking store at {uri}" in err and "unchanged on disk" in err
    assert (second / DIFFUSERS_FILE).is_file() and Path(cfg_down.register.eval_metrics).is_file()
    server = _start_server(tmp_path, port)  # back, same database
    try:
        assert main(["register", "--params", str(params)]) == 0
        assert str(MlflowClient(uri).get_model_version_by_alias("tiny-pcm", "champion").version) == "2"
    finally:
        _stop(server)
