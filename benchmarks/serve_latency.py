"""Latency per image of a registered model behind `mlflow models serve`, at 1, 2 and 4 steps, over HTTP on loopback.

The model: --model URI in --tracking-uri (e.g. the demo's champion after `make demo`), or by default a stand-in
built here in a few seconds: the demo world's architecture (params.yaml: demo_teacher sizes, 32 px, SD1.5-shaped,
a PCM LoRA with M = 4 over N = 50 at the demo's LoRA rank), trained for 2 steps only. Training changes weights, not
the work per image, so its latency is the demo model's.

The server is the InferenceService's command (pipelines/serve.py) with its CPU model config (warm-up at load), in a
process group of its own. Per step count: --requests sequential requests of one prompt (seeds 0, 1, ...), after one
untimed request; each is timed end to end (wall clock) and by the server process's CPU time (user + sys, from
/proc), which contention on a shared machine inflates less. Also: the time from start to /ping, the first request's
latency, and the same rows through model.predict in this process (no HTTP, in a worker thread as the server
calls it), alternating with the HTTP requests so that both see the same load; each served image must equal
model.predict's.

    python benchmarks/serve_latency.py [--requests 20] [--model models:/pcm-demo-sd15-4phase@champion
                                        --tracking-uri sqlite:///$PWD/mlflow/mlflow.db]
"""

import argparse
import base64
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
import serve  # noqa: E402  pipelines/serve.py: the service's command and model config

PROMPT = "a red circle in the center on a gray background"
STEPS = (1, 2, 4)


def build_stand_in(root: Path) -> tuple[str, str]:
    """(model URI, tracking URI) of a demo-architecture model registered under root (see the module docstring)."""
    from pcm import stages
    from pcm.config import config_from_dict

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    world = {"demo": {"output_dir": str(root / "shapes"), "num_images": 64, "shard_size": 32},
             "data": {"inputs": [str(root / "shapes" / "shard-{00000..00001}.tar")],
                      "output_dir": str(root / "prepared"), "shard_size": 32},
             "demo_teacher": {**params["demo_teacher"], "output_dir": str(root / "teacher"), "vae_steps": 2,
                              "unet_steps": 2, "holdout": 8, "eval_prompts": 2, "eval_steps": 2},
             "teacher": {"family": "sd15", "model": str(root / "teacher")}, "lora": params["lora"],
             "distill": params["distill"],
             "train": {**params["train"], "output_dir": str(root / "pcm-m4"), "max_steps": 2, "batch_size": 8,
                       "lr_warmup_steps": 0, "checkpoint_every": 2, "validate_every": 0, "shuffle_buffer": 8},
             "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "experiment": "serve-latency"},
             "register": {"lora": str(root / "pcm-m4" / "lora"), "model_name": "serve-latency",
                          "eval_metrics": str(root / "none.json"), "output": str(root / "registered.json")}}
    for stage in (stages.demo_data, stages.prepare, stages.demo_teacher):
        stage(config_from_dict(world), progress=False)
    stages.distill(config_from_dict(world), progress=False)
    version = stages.register(config_from_dict(world))["version"]  # no evaluation: a candidate, served by number
    return f"models:/serve-latency/{version}", world["tracking"]["uri"]


def _cpu_seconds(group: int) -> float:
    """CPU seconds (user + sys) of the live processes in a process group: the server is `mlflow models serve` and
    the uvicorn process it starts."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == group:  # pgrp
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def start_server(model: str, store: str, log: Path) -> tuple[subprocess.Popen, str, float]:
    """(process, URL, seconds to /ping) of the service's command on a loopback port."""
    manifest = serve.inference_service(serve.parser().parse_args(
        ["--model-name", "x", "--model", model, "--name", "x", "--tracking-uri", store, "--gpus", "0", "-o", "-"]))
    container = manifest["spec"]["predictor"]["containers"][0]
    config = next(e["value"] for e in container["env"] if e["name"] == "MLFLOW_PYFUNC_INFERENCE_CONFIG")
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_PYFUNC_INFERENCE_CONFIG": config}
    start = time.perf_counter()
    process, url = serve.run_here(container["command"], env, log, 600)
    return process, url, time.perf_counter() - start


def request(url: str, steps: int, seed: int) -> bytes:
    body = json.dumps({"dataframe_records": [{"prompt": PROMPT, "steps": steps, "seed": seed}]}).encode()
    call = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(call, timeout=300) as response:
        return base64.b64decode(json.loads(response.read())["predictions"][0]["image"])


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {"n": len(values), "median": statistics.median(values), "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "min": ordered[0], "max": ordered[-1],
            "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]}


def load_in_process(model: str, store: str):
    import mlflow

    mlflow.set_tracking_uri(store)
    return mlflow.pyfunc.load_model(model, model_config={"device": "cpu"})


def measure(url: str, group: int, local, requests: int) -> dict:
    """Per step count: `requests` timed requests over HTTP and through model.predict here, alternating, so that
    both see the same load on a shared machine; the images must be the same. model.predict runs in a worker thread,
    as the scoring server runs it (asyncio.to_thread): torch's intra-op threads differ between the main thread and
    others, and on an oversubscribed machine two OpenMP threads in the main thread were measured 10-100x slower."""
    with ThreadPoolExecutor(1) as worker:
        return worker.submit(_measure, url, group, local, requests).result()


def _measure(url: str, group: int, local, requests: int) -> dict:
    out = {}
    for steps in STEPS:
        request(url, steps, 10_000)  # untimed
        local.predict(pd.DataFrame({"prompt": [PROMPT], "steps": [steps], "seed": [10_000]}))
        times = {"http_wall_s": [], "http_server_cpu_s": [], "local_wall_s": [], "local_cpu_s": []}
        for seed in range(requests):
            cpu, start = _cpu_seconds(group), time.perf_counter()
            served = request(url, steps, seed)
            times["http_wall_s"].append(time.perf_counter() - start)
            times["http_server_cpu_s"].append(_cpu_seconds(group) - cpu)
            cpu, start = time.process_time(), time.perf_counter()
            direct = local.predict(pd.DataFrame({"prompt": [PROMPT], "steps": [steps], "seed": [seed]}))["image"][0]
            times["local_wall_s"].append(time.perf_counter() - start)
            times["local_cpu_s"].append(time.process_time() - cpu)
            if served != direct:
                raise RuntimeError(f"steps={steps} seed={seed}: the server's image differs from model.predict's")
        out[steps] = {key: summary(values) for key, values in times.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="", help="model URI to serve (default: build the stand-in)")
    p.add_argument("--tracking-uri", default="", help="the store holding --model")
    p.add_argument("--requests", type=int, default=20, help="timed requests per step count (default 20)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_latency.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        built = time.perf_counter()
        model, store = (args.model, args.tracking_uri) if args.model else build_stand_in(Path(folder))
        built = time.perf_counter() - built
        local = load_in_process(model, store)
        process, url, ready = start_server(model, store, Path(folder) / "serve.log")
        try:
            first = time.perf_counter()
            request(url, 4, 0)
            first = time.perf_counter() - first
            timed = measure(url, process.pid, local, args.requests)
        finally:
            serve.stop_here(process)
    result = {"model": model if args.model else "stand-in (demo architecture, 2 training steps)",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "prompt": PROMPT,
              "build_s": built, "start_to_ready_s": ready, "first_request_s": first, "steps": timed}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"start to /ping {ready:.1f} s (model loaded, one warm-up image); first request (4 steps) {first:.3f} s")
    print("| steps | HTTP wall, median [p90] (min-max) | server CPU, median | model.predict wall / CPU, median | "
          "requests |")
    print("|---|---|---|---|---|")
    for steps in STEPS:
        t = timed[steps]
        w, c = t["http_wall_s"], t["http_server_cpu_s"]
        print(f"| {steps} | {w['median'] * 1000:.0f} ms [{w['p90'] * 1000:.0f}] ({w['min'] * 1000:.0f}-"
              f"{w['max'] * 1000:.0f}) | {c['median'] * 1000:.0f} ms | {t['local_wall_s']['median'] * 1000:.0f} / "
              f"{t['local_cpu_s']['median'] * 1000:.0f} ms | {w['n']} |")
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
