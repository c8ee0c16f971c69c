"""What the PCM pipelines share: the task graph and the command line (`compile -o FILE.yaml`, `run --local`,
`submit --host URL --experiment NAME`); what each task gets from the cluster is cluster.py.

The graph: [demo-data ->] prepare [-> demo-teacher] -> distill per run (dsl.ParallelFor) -> evaluate (all LoRAs,
dsl.Collected) -> register (the LoRA of `register_method` with `register_phases`). Every task is a component of
components/ over pcm.stages; the params file travels as text, so a compiled package holds its own defaults.
"""

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the components package
if str(ROOT / "pipelines") not in sys.path:
    sys.path.insert(0, str(ROOT / "pipelines"))  # cluster.py beside this file
from cluster import Resources, apply, spec_patch  # noqa: E402


def runs_of(params_text: str) -> list[dict]:
    """pipeline.distill_runs of a params text as ParallelFor items: [{name, method, num_phases}, ...]."""
    from pcm.config import config_from_yaml

    runs = config_from_yaml(params_text).pipeline.distill_runs
    return [{"name": name, "method": run.method, "num_phases": run.num_phases} for name, run in runs.items()]


def make_pipeline(name: str, demo: bool, params_text: str, teacher_model: str, r: Resources | None):
    """The pipeline function; r = None leaves out every Kubernetes setting (kfp.local runs).

    Work that outlives a task (distill checkpoints, the evaluation cache) goes to work_root/runs/<run id>/: the id is
    KFP's pipeline run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER), so a retried task resumes and a new run starts fresh,
    or continue_run, an earlier run's id, whose checkpoints the distill tasks then continue (components/workdir.py).
    """
    from kfp import dsl

    import components as c

    work_default = "/mnt/work" if r is not None else ""
    default_runs = runs_of(params_text)

    @dsl.pipeline(name=name, description="PCM distillation: data -> distill per phase count -> evaluate -> register")
    # one dsl.Collected per consumer: kfp 2.17's compiler fails on a Collected object shared by two tasks
    def pipeline(params: str = params_text, overrides: list = [], teacher_model: str = teacher_model,  # noqa: B006
                 shard_urls: list = [], dvc_repo: str = "", dvc_rev: str = "", dvc_path: str = "",  # noqa: B006
                 runs: list = default_runs, max_steps: int = 0, eval_steps: list = [],  # noqa: B006
                 mlflow_uri: str = "", work_root: str = work_default, continue_run: str = "",
                 register_method: str = "pcm", register_phases: int = 4):
        common = {"params": params, "overrides": overrides, "mlflow_uri": mlflow_uri}
        run_scope = {"work_root": work_root, "pipeline_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                     "continue_run": continue_run}
        tasks, teacher = {}, {}
        if demo:
            tasks["demo-data"] = shards = c.demo_data(**common)
            tasks["prepare"] = prepared = c.prepare(**common, shard_urls=[], dvc_repo="", dvc_rev="", dvc_path="",
                                                    shards=shards.outputs["shards"])
            tasks["demo-teacher"] = trained = c.demo_teacher(**common, prepared=prepared.outputs["prepared"])
            teacher = {"teacher": trained.outputs["teacher"]}
        else:
            tasks["prepare"] = prepared = c.prepare(**common, shard_urls=shard_urls, dvc_repo=dvc_repo,
                                                    dvc_rev=dvc_rev, dvc_path=dvc_path)
        with dsl.ParallelFor(runs) as run:
            # run.name is the loop channel's own name ("runs-loop-item", the same in every iteration), not the
            # item's "name" key: ask for that sub-variable explicitly
            tasks["distill"] = distilled = c.distill(
                **common, **run_scope, teacher_model=teacher_model, run_name=run.__getattr__("name"), method=run.method,
                num_phases=run.num_phases, max_steps=max_steps, num_gpus=r.gpus if r else 0,
                prepared=prepared.outputs["prepared"], **teacher)
        tasks["evaluate"] = evaluated = c.evaluate(**common, **run_scope, teacher_model=teacher_model,
                                                   eval_steps=eval_steps, prepared=prepared.outputs["prepared"],
                                                   loras=dsl.Collected(distilled.outputs["lora"]), **teacher)
        tasks["register"] = c.register(**common, method=register_method, num_phases=register_phases,
                                       loras=dsl.Collected(distilled.outputs["lora"]),
                                       results=evaluated.outputs["results"])
        if r is not None:
            for task_name, task in tasks.items():
                apply(task, r, task_name)

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


def _resources(args, params_text: str) -> Resources:
    from pcm.config import config_from_yaml

    selector = dict(item.split("=", 1) for item in args.node_selector)
    grace = config_from_yaml(params_text).pipeline.termination_grace_seconds
    return Resources(gpus=args.gpus, node_selector=selector, data_pvc=args.data_pvc, work_pvc=args.work_pvc,
                     secret=args.secret, grace_seconds=grace)


def spec_patch_path(package: str | Path) -> Path:
    """Where `compile` writes the cluster's COMPILED_PIPELINE_SPEC_PATCH beside the package: NAME.spec-patch.json."""
    package = Path(package)
    return package.with_name(package.stem + ".spec-patch.json")


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
    resources = _resources(args, params_text)
    pipeline = make_pipeline(name, demo, params_text, teacher_model, resources)
    if args.command == "compile":
        from kfp import compiler

        compiler.Compiler().compile(pipeline, args.output)
        # the pods' grace period and fsGroup: KFP's package has no field for them (cluster.py)
        spec_patch_path(args.output).write_text(json.dumps(spec_patch(resources), indent=2) + "\n")
        print(args.output)
        print(spec_patch_path(args.output))
        return 0
    import kfp

    client = kfp.Client(host=args.host)
    result = client.create_run_from_pipeline_func(pipeline, arguments=_arguments(args.arg),
                                                  experiment_name=args.experiment)
    print(json.dumps({"run_id": result.run_id, "experiment": args.experiment, "host": args.host}))
    return 0
