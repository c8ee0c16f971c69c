"""Serving the champion (issue 21 §1): `mlflow models serve -m models:/NAME@champion --env-manager local` answers a
prompt with the PNG bytes `pcm sample` writes for the same inputs; the model loads at start; concurrent requests are
serialized; a bad request is a 400 with a message, checked before anything is generated."""

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import yaml
from builders import card, make_lora, save_tiny
from mlflow.exceptions import MlflowException

import pcm.registry
from pcm import stages
from pcm.config import SampleConfig, config_from_dict
from pcm.inference import lora_sha256
from pcm.registry import load_registered
from pcm.serving import request_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import serve  # noqa: E402  pipelines/serve.py

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PROMPT = "a red circle at the top left on a gray background"
MODEL = "models:/tiny-serve@champion"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """(cfg, teacher folder) of a project whose store holds tiny-serve v1 @champion: a LoRA (random B, 2 phases over
    N = 20, 16 px) on a tiny SD1.5 teacher of its own, so that a test may move the teacher away."""
    root = tmp_path_factory.mktemp("serving")
    teacher = save_tiny(root / "teacher", "sd15")
    lora = make_lora(teacher, "sd15", root / "v1" / "lora")
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(json.dumps({"pcm-M2/k2/fid_teacher": 5.0}))
    (root / "eval" / "info.json").write_text(json.dumps({"lora_sha256": {"pcm-M2": lora_sha256(lora)}}))
    cfg = config_from_dict({"teacher": {"model": str(teacher)}, "data": {"resolution": 16},
                            "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "serving"},
                            "register": {"lora": str(lora), "model_name": "tiny-serve", "gate_threshold": 100.0,
                                         "eval_metrics": str(root / "eval" / "metrics.json"),
                                         "gate_metric": "pcm-M2/k2/fid_teacher", "output": str(root / "r.json")}})
    assert stages.register(cfg)["aliases"] == ["candidate", "champion"]
    return cfg, teacher


# ---- the request contract, without a model ------------------------------------------------------------------------

TINY_CARD = card("sd15", "unused")  # M = 2, N = 20, recommended 2 steps


def _refused(frame) -> str:
    with pytest.raises(MlflowException) as refused:
        request_rows(frame, TINY_CARD, SampleConfig())
    assert refused.value.get_http_status_code() == 400 and refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert isinstance(refused.value, ValueError)  # what Python callers caught before
    message = refused.value.message
    assert "\n" not in message
    return message


@pytest.mark.parametrize("frame, expected", [
    ({"prompt": ["a"], "step": [1]}, "unknown column(s) 'step'; the columns are prompt (required), negative_prompt, "
                                     "steps, guidance_scale, gamma, seed (optional)"),
    ({"text": ["a"]}, "unknown column(s) 'text'"),
    ({"steps": [1]}, "no 'prompt' column"),
    ({"prompt": []}, "the request has no rows"),
    ({"prompt": ["a", None]}, "row 1: prompt is missing"),
    ({"prompt": ["  "]}, "row 0: prompt='  ': must be a non-empty string"),
    ({"prompt": [3]}, "row 0: prompt=3: must be a non-empty string"),
    ({"prompt": ["a"], "steps": [0]}, "row 0: number of sampling steps K=0 must be >= 1"),
    ({"prompt": ["a", "b"], "steps": [2, 1.5]}, "row 1: steps=1.5: must be an integer"),
    ({"prompt": ["a"], "steps": ["four"]}, "row 0: steps='four': must be a finite integer"),
    ({"prompt": ["a"], "steps": [True]}, "row 0: steps=True: must be a finite integer"),
    ({"prompt": ["a"], "steps": [21]}, "row 0: steps=21: at most 20 (the LoRA's distillation grid N)"),
    ({"prompt": ["a"], "gamma": [1.5]}, "row 0: gamma=1.5: must be in [0, 1]"),
    ({"prompt": ["a"], "gamma": [float("inf")]}, "row 0: gamma=inf: must be a finite number"),
    ({"prompt": ["a"], "guidance_scale": ["high"]}, "row 0: guidance_scale='high': must be a finite number"),
    ({"prompt": ["a"], "guidance_scale": [-1.0]}, "row 0: guidance_scale=-1.0: must be >= 0"),
    ({"prompt": ["a"], "seed": [-1]}, "row 0: seed=-1: must be in 0.."),
    ({"prompt": ["a"], "negative_prompt": [7]}, "row 0: negative_prompt=7: must be a string"),
    ("a prompt", "the request is a str, not a table of rows"),
])
def test_a_bad_request_is_a_400_naming_the_row_the_column_and_what_is_allowed(frame, expected):
    message = _refused(pd.DataFrame(frame) if isinstance(frame, dict) else frame)
    assert message.startswith(expected), message


def test_a_good_request_resolves_missing_values_to_the_defaults():
    frame = pd.DataFrame({"prompt": ["a", "b"], "steps": [1, None], "seed": [3.0, None], "gamma": [None, 0.5]})
    rows = request_rows(frame, TINY_CARD, SampleConfig(guidance_scale=1.5))
    assert rows == [{"prompt": "a", "negative_prompt": "", "steps": 1, "guidance_scale": 1.5, "gamma": 0.0, "seed": 3},
                    {"prompt": "b", "negative_prompt": "", "steps": 2, "guidance_scale": 1.5, "gamma": 0.5, "seed": 0}]
    assert request_rows([{"prompt": "c"}], TINY_CARD)[0]["steps"] == 2  # dataframe_records as a list of dicts


# ---- the loaded model ---------------------------------------------------------------------------------------------

def test_a_bad_row_anywhere_is_refused_before_the_first_image_is_generated(champion, monkeypatch):
    cfg, teacher = champion
    model = load_registered(cfg, MODEL)
    calls = []
    monkeypatch.setattr(pcm.registry, "generate_pngs", lambda *args: calls.append(args) or [b""])
    with pytest.raises(MlflowException, match=r"row 2: gamma=2: must be in \[0, 1\]"):
        model.predict(pd.DataFrame({"prompt": ["a", "b", "c"], "gamma": [0.0, 0.1, 2.0]}))
    assert calls == []


def test_concurrent_predictions_are_serialized(champion, monkeypatch):
    cfg, teacher = champion
    model = load_registered(cfg, MODEL)
    inside, most, guard = [0], [0], threading.Lock()

    def one_at_a_time(teacher, card, adapter, rows, defaults):
        with guard:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.05)
        with guard:
            inside[0] -= 1
        return [row["prompt"].encode() for row in rows]

    monkeypatch.setattr(pcm.registry, "generate_pngs", one_at_a_time)
    with ThreadPoolExecutor(4) as pool:
        out = list(pool.map(lambda i: model.predict(pd.DataFrame({"prompt": [f"p{i}"]}))["image"][0], range(8)))
    assert out == [f"p{i}".encode() for i in range(8)] and most[0] == 1


# ---- mlflow models serve ------------------------------------------------------------------------------------------

def _serve(uri: str, store: str, config: str, log: Path) -> tuple[subprocess.Popen, str]:
    """The InferenceService's command (pipelines/serve.py) run here with the service's MLFLOW_PYFUNC_INFERENCE_CONFIG;
    (process, base URL) once /ping answers (the model is loaded by then). Killed, and RuntimeError with its log,
    when not up in 240 s."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_PYFUNC_INFERENCE_CONFIG": config}
    return serve.run_here(serve.serve_command(uri, 60), env, log, 240)


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _image(answer: dict) -> bytes:
    return base64.b64decode(answer["predictions"][0]["image"])


REQUESTS = [{"steps": 2, "guidance_scale": 1.0, "gamma": 0.0, "seed": 3},
            {"steps": 1, "guidance_scale": 2.0, "gamma": 0.3, "seed": 7},
            {"steps": 4, "guidance_scale": 1.0, "gamma": 0.0, "seed": 0}]


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_bytes_of_pcm_sample(champion, tmp_path):
    cfg, teacher = champion
    expected = []
    for i, r in enumerate(REQUESTS):
        done = stages.sample(cfg, [PROMPT], str(tmp_path / f"sample-{i}.png"), model=MODEL, **r)
        expected.append(Path(done["images"][0]).read_bytes())
    manifest = _manifest(tmp_path, "--gpus", "0")  # the CPU service's model config: device cpu, warm-up at load
    container = manifest["spec"]["predictor"]["containers"][0]
    config = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_PYFUNC_INFERENCE_CONFIG")
    process, url = _serve(MODEL, cfg.tracking.uri, config, tmp_path / "serve.log")
    moved = teacher.with_name("teacher-away")
    try:
        assert "warm-up generation done" in (tmp_path / "serve.log").read_text()
        teacher.rename(moved)  # loaded at start: the running server no longer needs the files
        status, answer = _post(url, {"dataframe_split": {"columns": ["prompt", *REQUESTS[0]],
                                                         "data": [[PROMPT, *REQUESTS[0].values()]]}})
        assert status == 200 and _image(answer) == expected[0]
        with ThreadPoolExecutor(3) as pool:  # concurrent requests: serialized, each its own image
            answers = list(pool.map(lambda r: _post(url, {"dataframe_records": [{"prompt": PROMPT, **r}]}),
                                    REQUESTS))
        assert [status for status, _ in answers] == [200] * 3
        assert [_image(answer) for _, answer in answers] == expected
        status, answer = _post(url, {"dataframe_records": [{"prompt": PROMPT, "steps": 0}]})
        assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
        assert "row 0: number of sampling steps K=0 must be >= 1" in answer["message"] and "stack_trace" not in answer
        status, answer = _post(url, {"dataframe_records": [{"prompt": PROMPT, "step": 2}]})
        assert status == 400 and "unknown column(s) 'step'" in answer["message"]
        assert _post(url, {"dataframe_records": [{"prompt": PROMPT, "seed": 3}]})[0] == 200  # still serving
    finally:
        serve.stop_here(process)
        if moved.exists():
            moved.rename(teacher)


# ---- the KServe InferenceService (pipelines/serve.py) -------------------------------------------------------------

# KServe v1beta1 PredictorSpec: its ComponentExtensionSpec fields and the framework / custom-container keys; the
# rest is a Kubernetes PodSpec, checked against the Kubernetes client's own model of it.
PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
                    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
                    "annotations", "deploymentStrategy", "workerSpec", "model"}
SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float)}


def _strict(data, kind: str, where: str) -> None:
    """data is a valid `kind` of the Kubernetes client's models (V1PodSpec, list[V1Container], dict(str, str), ...):
    every key one of its fields, every required field present, every leaf of its type, all the way down."""
    from kubernetes import client

    if kind.startswith("list["):
        assert isinstance(data, list), where
        for i, item in enumerate(data):
            _strict(item, kind[5:-1], f"{where}[{i}]")
    elif kind.startswith("dict("):
        assert isinstance(data, dict), where
        for key, value in data.items():
            _strict(value, kind[5:-1].split(", ", 1)[1], f"{where}.{key}")
    elif kind in SCALARS:
        assert isinstance(data, SCALARS[kind]) and (kind == "bool" or not isinstance(data, bool)), (where, data)
    elif kind != "object":  # object: IntOrString and the like
        model = getattr(client, kind)
        fields = {json_key: attr for attr, json_key in model.attribute_map.items()}
        assert isinstance(data, dict) and set(data) <= set(fields), (where, sorted(set(data) - set(fields)))
        model(**{fields[k]: v for k, v in data.items()})  # the client's own check of required fields and enums
        for key, value in data.items():
            _strict(value, model.openapi_types[fields[key]], f"{where}.{key}")


def _manifest(tmp_path, *flags) -> dict:
    out = tmp_path / "serve.yaml"
    assert serve.main(["--model-name", "sdxl-pcm", "--tracking-uri", "http://mlflow.mlflow:5000", "-o", str(out),
                       *flags]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 1
    return docs[0]


def _predictor_pod(manifest: dict) -> tuple[dict, dict]:
    predictor = manifest["spec"]["predictor"]
    pod = {k: v for k, v in predictor.items() if k not in PREDICTOR_FIELDS}
    _strict(pod, "V1PodSpec", "spec.predictor")
    return predictor, pod["containers"][0]


def test_the_inference_service_serves_the_champion_with_mlflow_on_a_gpu(tmp_path):
    manifest = _manifest(tmp_path)
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "sdxl-pcm" and set(manifest["spec"]) == {"predictor"}
    assert manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Serverless"
    predictor, container = _predictor_pod(manifest)
    assert set(predictor) - {"containers", "volumes", "securityContext", "tolerations"} <= PREDICTOR_FIELDS
    assert predictor["containerConcurrency"] == 1 and predictor["minReplicas"] == 1  # one generation at a time
    assert container["image"] == "ghcr.io/pcm-pipelines/pcm:0.1.0"
    assert container["command"][:7] == ["mlflow", "models", "serve", "-m", "models:/sdxl-pcm@champion",
                                        "--env-manager", "local"]
    assert container["command"][container["command"].index("--port") + 1] == "8080"
    assert container["ports"] == [{"containerPort": 8080, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # /ping answers once the model is loaded
        assert container[probe]["httpGet"]["port"] == 8080 and container[probe]["httpGet"]["path"] in ("/ping",
                                                                                                         "/health")
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 900  # --load-seconds, the default
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow.mlflow:5000"
    assert json.loads(env["MLFLOW_PYFUNC_INFERENCE_CONFIG"]["value"]) == {"device": "cuda", "warmup": True}
    assert set(env) == {"MLFLOW_TRACKING_URI", "MLFLOW_PYFUNC_INFERENCE_CONFIG", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "pcm-secrets", "key": "HF_TOKEN",
                                                            "optional": True}


def test_a_cpu_service_that_scales_to_zero_and_a_pinned_version(tmp_path):
    manifest = _manifest(tmp_path, "--gpus", "0", "--min-replicas", "0", "--model", "models:/sdxl-pcm/3",
                         "--name", "pcm-v3", "--namespace", "serving", "--base-model", "/mnt/data/models/sdxl",
                         "--node-selector", "pool=cpu")
    predictor, container = _predictor_pod(manifest)
    assert manifest["metadata"] == {"name": "pcm-v3", "namespace": "serving", "annotations": {
        "serving.kserve.io/deploymentMode": "Serverless", "pcm-pipelines/model": "models:/sdxl-pcm/3"}}
    assert predictor["minReplicas"] == 0 and "tolerations" not in predictor and predictor["nodeSelector"] == {
        "pool": "cpu"}
    assert "nvidia.com/gpu" not in container["resources"]["limits"] and "models:/sdxl-pcm/3" in container["command"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert json.loads(env["MLFLOW_PYFUNC_INFERENCE_CONFIG"]) == {"device": "cpu", "warmup": True,
                                                                 "base_model": "/mnt/data/models/sdxl"}


@pytest.mark.parametrize("flags, expected", [
    (["--min-replicas", "0", "--mode", "RawDeployment"], "--min-replicas 0 (scale to zero) needs --mode Serverless"),
    (["--name", "Bad_Name"], "--name 'Bad_Name': a DNS label"),
    (["--model", "runs:/abc/pcm-lora"], "--model 'runs:/abc/pcm-lora': give a registry URI"),
    (["--max-replicas", "0"], "--min-replicas must be >= 0 and --max-replicas >= max(1, --min-replicas)"),
])
def test_options_that_make_no_valid_service_are_one_line_and_exit_2(tmp_path, capsys, flags, expected):
    out = tmp_path / "serve.yaml"
    assert serve.main(["--model-name", "sdxl-pcm", "--tracking-uri", "http://m", "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"python pipelines/serve.py: error: {expected}") and not out.exists()


# ---- the scoring server's answers, in this process ----------------------------------------------------------------

def _invoke(app, body: dict) -> tuple[int, bytes]:
    """POST /invocations to MLflow's scoring app (an ASGI app) in this process: (status, body). A hand-made ASGI call,
    so that a test can replace the model's generation (monkeypatch) and see the answer the server would send."""
    import asyncio

    data = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/invocations", "raw_path": b"/invocations", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    sent, requests = [], [{"type": "http.request", "body": data, "more_body": False}]

    async def receive():
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected until the answer is sent

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_model_failure_is_a_500_in_one_line_with_the_traceback_in_the_log(champion, monkeypatch, caplog):
    from mlflow.pyfunc import scoring_server

    cfg, teacher = champion
    app = scoring_server.init(load_registered(cfg, MODEL))

    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore detail on a second line")

    monkeypatch.setattr(pcm.registry, "generate_pngs", out_of_memory)
    with caplog.at_level("ERROR", logger="pcm.serving"):
        status, body = _invoke(app, {"dataframe_records": [{"prompt": PROMPT, "steps": 2}]})
    answer = json.loads(body)
    assert status == 500 and answer["error_code"] == "INTERNAL_ERROR", (status, body)
    assert answer["message"] == ("the model failed while generating (RuntimeError: CUDA out of memory. Tried to "
                                 "allocate 20.00 MiB); the request was valid, the server's log has the traceback")
    assert "stack_trace" not in answer and b"\\n" not in body and PROMPT not in body.decode()  # nor the request
    failure = next(r for r in caplog.records if r.name == "pcm.serving")
    assert failure.exc_info[0] is RuntimeError and "out_of_memory" in caplog.text  # the traceback, in the log

    status, body = _invoke(app, {"dataframe_records": [{"prompt": PROMPT, "steps": 0}]})  # still the client's fault
    answer = json.loads(body)
    assert status == 400 and answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert answer["message"].startswith("row 0: number of sampling steps K=0 must be >= 1") and b"\\n" not in body
    monkeypatch.setattr(pcm.registry, "generate_pngs", lambda *args: [b"png"])
    status, body = _invoke(app, {"dataframe_records": [{"prompt": PROMPT}]})
    assert status == 200 and base64.b64decode(json.loads(body)["predictions"][0]["image"]) == b"png"


def test_a_model_failure_in_python_is_a_runtime_error_and_a_refusal_stays_a_value_error(champion, monkeypatch):
    from pcm.serving import ModelFailure

    cfg, teacher = champion
    model = load_registered(cfg, MODEL)
    monkeypatch.setattr(pcm.registry, "generate_pngs", lambda *args: 1 / 0)
    with pytest.raises(RuntimeError) as failed:  # what a Python caller of a failing model caught before
        model.predict(pd.DataFrame({"prompt": [PROMPT]}))
    assert isinstance(failed.value, ModelFailure) and failed.value.get_http_status_code() == 500
    assert "ZeroDivisionError: division by zero" in failed.value.message
    assert isinstance(failed.value.__cause__, ZeroDivisionError)
    with pytest.raises(ValueError, match="row 0: steps=21"):
        model.predict(pd.DataFrame({"prompt": [PROMPT], "steps": [21]}))
