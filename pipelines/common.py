"""What the PCM pipelines share: the task graph, the cluster resources of the tasks, and the command line
(`compile -o FILE.yaml`, `run --local`, `submit --host URL --experiment NAME`).

The graph: [demo-data ->] prepare [-> demo-teacher] -> distill per run (dsl.ParallelFor) -> evaluate (all LoRAs,
dsl.Collected) -> register (the LoRA of `register_method` with `register_phases`). Every task is a component of
components/ over pcm.stages; the params file travels as text, so a compiled package holds its own defaults.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the components package


@dataclass
class Resources:
    """Cluster settings of the tasks (compile time). gpus = 0: no accelerator request (CPU runs, kfp.local)."""

    gpus: int = 8  # GPUs of the distill task, one node; `accelerate launch --multi_gpu` inside when > 1
    accelerator: str = "nvidia.com/gpu"
    cpu: str = "32"  # CPU and memory limits of the distill task
    memory: str = "480Gi"
    shm_size: str = "64Gi"  # Memory emptyDir at /dev/shm (NCCL and DataLoader workers need more than 64 MB)
    data_pvc: str = "pcm-data"  # PVC with shards and teacher weights, mounted at /mnt/data on every task
    work_pvc: str = "pcm-work"  # PVC for checkpoints and caches, mounted at /mnt/work: a retried task resumes there
    secret: str = "pcm-secrets"  # its keys become env vars of every task (object store, hub token, MLflow)
    secret_keys: tuple[str, ...] = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "HF_TOKEN",
                                    "MLFLOW_TRACKING_TOKEN")
    node_selector: dict = field(default_factory=dict)  # e.g. {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    tolerations: tuple[str, ...] = ("nvidia.com/gpu",)  # taint keys tolerated (operator Exists, NoSchedule)
    retries: int = 3  # retries of the distill task (it resumes from its newest checkpoint)


def _cluster(task, r: Resources, gpu: bool) -> None:
    """PVCs, secrets, node placement; and for the GPU task: accelerators, /dev/shm, limits, retries."""
    from kfp import kubernetes

    kubernetes.mount_pvc(task, pvc_name=r.data_pvc, mount_path="/mnt/data")
    kubernetes.mount_pvc(task, pvc_name=r.work_pvc, mount_path="/mnt/work")
    kubernetes.use_secret_as_env(task, secret_name=r.secret, secret_key_to_env={k: k for k in r.secret_keys},
                                 optional=True)
    if not gpu:
        return
    if r.gpus > 0:
        task.set_accelerator_type(r.accelerator).set_accelerator_limit(r.gpus)
        for key in r.tolerations:
            kubernetes.add_toleration(task, key=key, operator="Exists", effect="NoSchedule")
    kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=r.shm_size)
    for key, value in r.node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    task.set_cpu_limit(r.cpu).set_memory_limit(r.memory).set_retry(num_retries=r.retries, backoff_duration="60s")


def runs_of(params_text: str) -> list[dict]:
    """pipeline.distill_runs of a params text as ParallelFor items: [{name, method, num_phases}, ...]."""
    from pcm.config import config_from_yaml

    runs = config_from_yaml(params_text).pipeline.distill_runs
    return [{"name": name, "method": run.method, "num_phases": run.num_phases} for name, run in runs.items()]


def make_pipeline(name: str, demo: bool, params_text: str, teacher_model: str, r: Resources | None):
    """The pipeline function; r = None leaves out every Kubernetes setting (kfp.local runs)."""
    from kfp import dsl

    import components as c

    work_default = "/mnt/work" if r is not None else ""
    default_runs = runs_of(params_text)

    @dsl.pipeline(name=name, description="PCM distillation: data -> distill per phase count -> evaluate -> register")
    # one dsl.Collected per consumer: kfp 2.17's compiler fails on a Collected object shared by two tasks
    def pipeline(params: str = params_text, overrides: list = [], teacher_model: str = teacher_model,  # noqa: B006
                 shard_urls: list = [], dvc_repo: str = "", dvc_rev: str = "", dvc_path: str = "",  # noqa: B006
                 runs: list = default_runs, max_steps: int = 0, eval_steps: list = [],  # noqa: B006
                 mlflow_uri: str = "", work_root: str = work_default, register_method: str = "pcm",
                 register_phases: int = 4):
        common = {"params": params, "overrides": overrides, "mlflow_uri": mlflow_uri}
        tasks, teacher = [], {}
        if demo:
            shards = c.demo_data(**common)
            prepared = c.prepare(**common, shard_urls=[], dvc_repo="", dvc_rev="", dvc_path="",
                                 shards=shards.outputs["shards"])
            trained = c.demo_teacher(**common, prepared=prepared.outputs["prepared"])
            tasks += [shards, trained]
            teacher = {"teacher": trained.outputs["teacher"]}
        else:
            prepared = c.prepare(**common, shard_urls=shard_urls, dvc_repo=dvc_repo, dvc_rev=dvc_rev,
                                 dvc_path=dvc_path)
        with dsl.ParallelFor(runs) as run:
            distilled = c.distill(**common, teacher_model=teacher_model, run_name=run.name, method=run.method,
                                  num_phases=run.num_phases, max_steps=max_steps, num_gpus=r.gpus if r else 0,
                                  work_root=work_root, prepared=prepared.outputs["prepared"], **teacher)
            if r is not None:
                _cluster(distilled, r, gpu=True)
        evaluated = c.evaluate(**common, teacher_model=teacher_model, eval_steps=eval_steps, work_root=work_root,
                               prepared=prepared.outputs["prepared"],
                               loras=dsl.Collected(distilled.outputs["lora"]), **teacher)
        registered = c.register(**common, method=register_method, num_phases=register_phases,
                                loras=dsl.Collected(distilled.outputs["lora"]),
                                results=evaluated.outputs["results"])
        if r is not None:
            for task in [*tasks, prepared, evaluated, registered]:
                _cluster(task, r, gpu=False)

    return pipeline


def _parser(name: str, default_params: Path) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python pipelines/{name}.py", description=f"the {name} Kubeflow pipeline")
    parser.add_argument("--params", default=str(default_params), help=f"params file (default: {default_params})")
    parser.add_argument("--image", help="project image the components run in (default: $PCM_IMAGE or the "
                        "published one)")
    commands = parser.add_subparsers(dest="command", required=True)
    compile_ = commands.add_parser("compile", help="write the pipeline package for `kfp run create`")
    compile_.add_argument("-o", "--output", required=True, help="output .yaml")
    for command in (compile_, submit := commands.add_parser("submit", help="compile and submit to a KFP host")):
        command.add_argument("--gpus", type=int, default=8, help="GPUs of the distill task (default 8)")
        command.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE")
        command.add_argument("--data-pvc", default="pcm-data")
        command.add_argument("--work-pvc", default="pcm-work")
        command.add_argument("--secret", default="pcm-secrets")
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--experiment", required=True)
    submit.add_argument("--arg", action="append", default=[], metavar="NAME=JSON", help="a pipeline argument")
    local = commands.add_parser("run", help="run it here with kfp.local (SubprocessRunner, this venv, no cluster)")
    local.add_argument("--local", action="store_true", required=True)
    local.add_argument("--root", default="local_outputs", help="kfp.local pipeline root (artifacts)")
    local.add_argument("--arg", action="append", default=[], metavar="NAME=JSON", help="a pipeline argument")
    return parser


def _resources(args) -> Resources:
    selector = dict(item.split("=", 1) for item in args.node_selector)
    return Resources(gpus=args.gpus, node_selector=selector, data_pvc=args.data_pvc, work_pvc=args.work_pvc,
                     secret=args.secret)


def _arguments(items: list[str]) -> dict:
    return {key: json.loads(value) for key, value in (item.split("=", 1) for item in items)}


def main(name: str, demo: bool, default_params: Path, teacher_model: str, argv: list[str] | None = None) -> int:
    args = _parser(name, default_params).parse_args(argv)
    if args.image:
        os.environ["PCM_IMAGE"] = args.image  # read when the components are first imported
    # one line of JSON (YAML parses it): kfp writes defaults into the package's header comment, where a multi-line
    # string would break the YAML
    params_text = json.dumps(yaml.safe_load(Path(args.params).read_text(encoding="utf-8")))
    if args.command == "run":
        from kfp import local

        # tasks run as subprocesses of this venv; the components package must be importable there as in the image
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(args.root).resolve()))
        run = make_pipeline(name, demo, params_text, teacher_model, None)(**_arguments(args.arg))
        print(json.dumps({"state": str(getattr(run, "state", "SUCCEEDED")), "root": args.root}))
        return 0
    pipeline = make_pipeline(name, demo, params_text, teacher_model, _resources(args))
    if args.command == "compile":
        from kfp import compiler

        compiler.Compiler().compile(pipeline, args.output)
        print(args.output)
        return 0
    import kfp

    client = kfp.Client(host=args.host)
    result = client.create_run_from_pipeline_func(pipeline, arguments=_arguments(args.arg),
                                                  experiment_name=args.experiment)
    print(json.dumps({"run_id": result.run_id, "experiment": args.experiment, "host": args.host}))
    return 0
