"""A KServe InferenceService that serves a registered model (by default models:/NAME@champion) with MLflow's own
scoring server in the project image. Generated and validated here, not applied (no cluster).

    python pipelines/serve.py --model-name sdxl-pcm --tracking-uri http://mlflow.mlflow:5000 -o serve.yaml
    kubectl apply -f serve.yaml

The predictor is a custom container running `mlflow models serve -m models:/NAME@champion --env-manager local`: the
image already holds pcm and its pinned dependencies, so nothing is installed when a pod starts (KServe's built-in
`mlflow` model format would serve through MLServer and install the model's requirements per pod instead). The pod
reads the version from the tracking server (artifacts proxied by it: no object-store keys), loads the base model
named in the version (a local folder on the data PVC, mounted at /mnt/data as in the pipelines, or a hub id) and the
LoRA, and only then answers /ping: the readiness probe is the model being loaded. The startup probe gives the load
--load-seconds (downloading SDXL from the hub takes minutes) before the liveness probe starts counting.

An alias is resolved when a pod starts: a new champion reaches the service with the next pod (`kubectl rollout
restart`, or a new revision); pin a version with --model models:/NAME/3 for a service that never changes by itself.
Requests are serialized inside the model (one generation at a time), so each pod takes one request at a time
(containerConcurrency 1) and the autoscaler adds pods by concurrency; --min-replicas 0 scales to zero when idle
(Knative, the Serverless deployment mode; the next request then waits for a pod to load the model).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import HUB, MLFLOW, Resources  # noqa: E402

PORT = 8080  # KServe routes to the container's first port; 8080 is its convention
MODES = ("Serverless", "RawDeployment")


def serve_command(model: str, timeout: int) -> list[str]:
    """MLflow's scoring server of the model on all interfaces, one worker (one copy of the model per pod)."""
    return ["mlflow", "models", "serve", "-m", model, "--env-manager", "local", "--host", "0.0.0.0", "--port",
            str(PORT), "--workers", "1", "--timeout", str(timeout)]


def _env(args) -> list[dict]:
    """Where the registry is, how the model loads (device, warm-up, a moved base), and the secret's keys a server
    needs: the tracking token, and the hub token for a hub-id base model."""
    config = {"device": "cuda" if args.gpus else "cpu", "warmup": True}
    if args.base_model:
        config["base_model"] = args.base_model
    secrets = [{"name": key, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": key, "optional": True}}}
               for key in (*MLFLOW, *HUB)]
    return [{"name": "MLFLOW_TRACKING_URI", "value": args.tracking_uri},
            {"name": "MLFLOW_PYFUNC_INFERENCE_CONFIG", "value": json.dumps(config)}, *secrets]


def _probe(path: str, period: int, failures: int) -> dict:
    return {"httpGet": {"path": path, "port": PORT}, "periodSeconds": period, "timeoutSeconds": 5,
            "failureThreshold": failures}


def container(args) -> dict:
    """The predictor's container: the scoring server, its probes on /ping (answered only once the model is loaded),
    its resources (GPUs as a limit: Kubernetes takes extended resources as limits) and the PVC mounts."""
    limits = {"cpu": args.cpu, "memory": args.memory, **({"nvidia.com/gpu": str(args.gpus)} if args.gpus else {})}
    return {
        "name": "kserve-container", "image": args.image, "command": serve_command(args.model, args.timeout),
        "ports": [{"containerPort": PORT, "protocol": "TCP"}], "env": _env(args),
        "resources": {"requests": {"cpu": args.cpu, "memory": args.memory}, "limits": limits},
        "startupProbe": _probe("/ping", 10, -(-args.load_seconds // 10)),
        "readinessProbe": _probe("/ping", 5, 3),
        "livenessProbe": _probe("/health", 30, 4),
        "volumeMounts": [{"name": "data", "mountPath": "/mnt/data", "readOnly": True},
                         {"name": "work", "mountPath": "/mnt/work"}],
    }


def inference_service(args) -> dict:
    """serving.kserve.io/v1beta1 InferenceService of the model."""
    ids, gpu = Resources(), bool(args.gpus)
    predictor = {
        "minReplicas": args.min_replicas, "maxReplicas": args.max_replicas, "containerConcurrency": 1,
        "scaleMetric": "concurrency", "scaleTarget": 1, "timeout": args.timeout,
        "securityContext": {"runAsUser": ids.uid, "runAsGroup": ids.uid, "runAsNonRoot": True,
                            "fsGroup": ids.fs_group},
        "containers": [container(args)],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": args.data_pvc, "readOnly": True}},
                    {"name": "work", "persistentVolumeClaim": {"claimName": args.work_pvc}}],
        **({"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]} if gpu else {}),
        **({"nodeSelector": dict(args.node_selector)} if args.node_selector else {}),
    }
    metadata = {"name": args.name, "annotations": {"serving.kserve.io/deploymentMode": args.mode,
                                                   "pcm-pipelines/model": args.model}}
    if args.namespace:
        metadata["namespace"] = args.namespace
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": metadata,
            "spec": {"predictor": predictor}}


def _selector(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: give KEY=VALUE")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python pipelines/serve.py", description=__doc__.split("\n")[0],
                                epilog="example: python pipelines/serve.py --model-name sdxl-pcm --tracking-uri "
                                "http://mlflow.mlflow:5000 -o serve.yaml")
    p.add_argument("--model-name", required=True, help="the registered model (register.model_name)")
    p.add_argument("--model", help="the model URI to serve (default: models:/<model-name>@champion; "
                   "models:/<model-name>/<version> pins a version)")
    p.add_argument("--tracking-uri", required=True, help="the MLflow tracking server holding the registry, as the "
                   "pods reach it")
    p.add_argument("--name", help="the InferenceService's name (default: the model name, lower-case)")
    p.add_argument("--namespace", default="", help="its namespace (default: kubectl's current one)")
    p.add_argument("--image", default="ghcr.io/pcm-pipelines/pcm:0.1.0", help="the project image (Dockerfile)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per pod (default 1; 0 serves on the CPU)")
    p.add_argument("--cpu", default="4", help="CPU request and limit per pod (default 4)")
    p.add_argument("--memory", default="32Gi", help="memory request and limit per pod (default 32Gi)")
    p.add_argument("--min-replicas", type=int, default=1, help="pods kept running (default 1; 0 scales to zero "
                   "when idle, Serverless mode only)")
    p.add_argument("--max-replicas", type=int, default=4, help="most pods under load (default 4)")
    p.add_argument("--mode", choices=MODES, default="Serverless", help="KServe deployment mode (default "
                   "Serverless: Knative, scale to zero possible)")
    p.add_argument("--timeout", type=int, default=300, help="seconds a request may take (default 300)")
    p.add_argument("--load-seconds", type=int, default=900, help="seconds a pod may take to load the model before "
                   "it is restarted (default 900)")
    p.add_argument("--base-model", default="", help="the base model where the pods find it, when not where the "
                   "version records it (a folder under /mnt/data, or a hub id)")
    p.add_argument("--data-pvc", default="pcm-data", help="PVC with the base model weights at /mnt/data (read-only)")
    p.add_argument("--work-pvc", default="pcm-work", help="PVC at /mnt/work (the image's HF_HOME, the hub cache)")
    p.add_argument("--secret", default="pcm-secrets", help="secret whose MLFLOW_TRACKING_TOKEN and HF_TOKEN keys "
                   "become env vars (missing keys: unset)")
    p.add_argument("--node-selector", type=_selector, action="append", default=[], metavar="KEY=VALUE",
                   help="node label the pods need, e.g. nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 (repeat)")
    p.add_argument("-o", "--output", required=True, help="output manifest .yaml, for `kubectl apply -f`")
    return p


def _problem(args) -> str:
    """What is wrong with the options, in one line; empty when nothing is."""
    name = args.name
    if not name or len(name) > 63 or not name[0].isalpha() or not all(c.isalnum() or c == "-" for c in name) \
            or name != name.lower() or name.endswith("-"):
        return (f"--name {name!r}: a DNS label (lower-case letters, digits and '-', starting with a letter, at most "
                "63); give --name")
    if not args.model.startswith("models:/"):
        return f"--model {args.model!r}: give a registry URI, models:/NAME@ALIAS or models:/NAME/VERSION"
    if args.min_replicas < 0 or args.max_replicas < max(1, args.min_replicas):
        return "--min-replicas must be >= 0 and --max-replicas >= max(1, --min-replicas)"
    if args.min_replicas == 0 and args.mode != "Serverless":
        return "--min-replicas 0 (scale to zero) needs --mode Serverless"
    if args.gpus < 0 or args.timeout < 1 or args.load_seconds < 10:
        return "--gpus must be >= 0, --timeout >= 1 and --load-seconds >= 10"
    return ""


def run_here(command: list[str], env: dict, log: Path, seconds: float) -> tuple[subprocess.Popen, str]:
    """The service's command on this machine: on a free loopback port, in a process group of its own, with this
    venv's executables first on the PATH (mlflow execs `uvicorn` by name); (process, base URL) once /ping answers,
    which is once the model is loaded. Stopped, and RuntimeError with its log's end, when not up within seconds.
    What the serving test and benchmarks/serve_latency.py run."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = list(command)
    command[command.index("--host") + 1], command[command.index("--port") + 1] = "127.0.0.1", str(port)
    venv = Path(sys.executable).parent
    env = {**env, "PATH": f"{venv}{os.pathsep}{env.get('PATH', os.environ.get('PATH', ''))}"}
    with open(log, "wb") as out:
        process = subprocess.Popen([str(venv / command[0]), *command[1:]], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if urllib.request.urlopen(f"{url}/ping", timeout=2).status == 200:
                return process, url
        except OSError:
            time.sleep(0.3)
    stop_here(process)
    raise RuntimeError(f"{' '.join(command)} did not answer /ping in {seconds:g} s: {log.read_text()[-3000:]}")


def stop_here(process: subprocess.Popen) -> None:
    """Stops a run_here process group: SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.model = args.model or f"models:/{args.model_name}@champion"
    args.name = args.name or args.model_name.lower().replace("_", "-").replace(".", "-")
    problem = _problem(args)
    if problem:
        print(f"python pipelines/serve.py: error: {problem}", file=sys.stderr)
        return 2
    try:
        Path(args.output).write_text(yaml.safe_dump(inference_service(args), sort_keys=False, width=10_000))
    except OSError as err:
        print(f"python pipelines/serve.py: error: -o {args.output}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
