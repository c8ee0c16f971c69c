"""What the PCM pipelines share: the task graph and the command line (`compile -o FILE.yaml`, `run --local`,
`submit --host URL --experiment NAME`); what each task gets from the cluster is cluster.py.

The graph: [demo-data ->] prepare [-> demo-teacher] -> distill per run (dsl.ParallelFor) -> evaluate (all LoRAs,
dsl.Collected) -> register (the LoRA of `register_method` with `register_phases`). Every task is a component of
components/ over pcm.stages; the params file travels as text, so a compiled package holds its own defaults.
Compile options add importers (--teacher-uri, --fid-reference-uri: inputs the KFP UI shows, reused by URI), a Kueue
queue for the distill pods (--queue-name) and turn caching off (--no-cache); CACHING says which tasks may reuse.
"""

import argparse
import hashlib
import inspect
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # the components package
if str(ROOT / "pipelines") not in sys.path:
    sys.path.insert(0, str(ROOT / "pipelines"))  # cluster.py beside this file
from cluster import Resources, apply, device_gpus, queue_name_problem, spec_patch  # noqa: E402

# Which tasks KFP may answer from its cache (a finished execution with the same component and the same inputs). The
# data tasks are functions of their inputs. distill and evaluate also read the pipeline run's id (their work folder),
# so they never reuse another run's result, and each distillation's key holds its own config hash besides (the
# ParallelFor item's config_hash). register's point is its side effect, a new model version: never skipped.
CACHING = {"demo-data": True, "prepare": True, "demo-teacher": True, "import-teacher": True,
           "import-fid-reference": True, "distill": True, "evaluate": False, "register": False}


@dataclass(frozen=True)
class Imports:
    """Inputs that enter the pipeline through dsl.importer (compile options): object-store URIs (s3://, gs://,
    minio://; a local path under kfp.local) that the KFP UI shows as the run's inputs. Each becomes a pipeline
    parameter of that name, its default the URI given at compile time; empty = no importer and no parameter."""

    teacher_uri: str = ""  # a diffusers pipeline folder, the teacher of distill and evaluate (replaces teacher_model)
    fid_reference_uri: str = ""  # a prepared-shards folder of FID reference images (eval.reference_images)


def config_hash(params_text: str, method: str, num_phases: int) -> str:
    """16 hex digits of sha256 over what one distillation is: the params (parsed, so layout does not count) with its
    method and phase count."""
    # as config_from_yaml reads it: JSON (what the pipeline passes) first, as PyYAML reads JSON's 2e-06 as a string
    params = json.loads(params_text) if params_text.lstrip().startswith("{") else yaml.safe_load(params_text)
    values = [params, {"distill.method": method, "distill.num_phases": num_phases}]
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def runs_of(params_text: str) -> list[dict]:
    """pipeline.distill_runs of a params text as ParallelFor items: [{name, method, num_phases, config_hash}, ...]."""
    from pcm.config import config_from_yaml

    runs = config_from_yaml(params_text).pipeline.distill_runs
    return with_hashes([{"name": name, "method": run.method, "num_phases": run.num_phases}
                        for name, run in runs.items()], params_text)


def with_hashes(runs: list[dict], params_text: str) -> list[dict]:
    """The runs items, each with the config_hash of its distillation under params_text (kept where given)."""
    return [{**run, "config_hash": run.get("config_hash") or config_hash(params_text, run["method"],
                                                                         run["num_phases"])} for run in runs]


def make_pipeline(name: str, demo: bool, params_text: str, teacher_model: str, r: Resources | None,
                  imports: Imports = Imports(), cache: bool = True):  # noqa: B008 (frozen, never mutated)
    """The pipeline function; r = None leaves out every Kubernetes setting (kfp.local runs). cache = False: no task
    reuses a cached result (CACHING otherwise).

    Work that outlives a task (distill checkpoints, the evaluation cache) goes to work_root/runs/<run id>/: the id is
    KFP's pipeline run id (dsl.PIPELINE_JOB_ID_PLACEHOLDER), so a retried task resumes and a new run starts fresh,
    or continue_run, an earlier run's id, whose checkpoints the distill tasks then continue (components/workdir.py).
    """
    from kfp import dsl

    import components as c

    if demo and imports.teacher_uri:
        raise ValueError("--teacher-uri: the demo pipeline trains its own teacher (the demo-teacher task)")
    work_default = "/mnt/work" if r is not None else ""
    default_runs = runs_of(params_text)

    def parameters(params: str = params_text, overrides: list = [], teacher_model: str = teacher_model,  # noqa: B006
                   shard_urls: list = [], dvc_repo: str = "", dvc_rev: str = "", dvc_path: str = "",  # noqa: B006
                   runs: list = default_runs, max_steps: int = 0, eval_steps: list = [],  # noqa: B006
                   mlflow_uri: str = "", work_root: str = work_default, continue_run: str = "",
                   register_method: str = "pcm", register_phases: int = 4, teacher_uri: str = imports.teacher_uri,
                   fid_reference_uri: str = imports.fid_reference_uri):
        """The pipeline's parameters, their defaults the compiled package's; an import not asked for is left out."""

    signature = inspect.signature(parameters)
    signature = signature.replace(parameters=[p for p in signature.parameters.values()
                                              if getattr(imports, p.name, True)])  # an import: if given

    # one dsl.Collected per consumer: kfp 2.17's compiler fails on a Collected object shared by two tasks
    def pipeline(*channels):
        p = SimpleNamespace(**dict(zip(signature.parameters, channels, strict=True)))  # one channel each
        common = {"params": p.params, "overrides": p.overrides, "mlflow_uri": p.mlflow_uri}
        run_scope = {"work_root": p.work_root, "pipeline_run": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                     "continue_run": p.continue_run}
        tasks, teacher, reference = {}, {}, {}
        if demo:
            tasks["demo-data"] = shards = c.demo_data(**common)
            tasks["prepare"] = prepared = c.prepare(**common, shard_urls=[], dvc_repo="", dvc_rev="", dvc_path="",
                                                    shards=shards.outputs["shards"])
            tasks["demo-teacher"] = trained = c.demo_teacher(**common, prepared=prepared.outputs["prepared"])
            teacher = {"teacher": trained.outputs["teacher"]}
        else:
            tasks["prepare"] = prepared = c.prepare(**common, shard_urls=p.shard_urls, dvc_repo=p.dvc_repo,
                                                    dvc_rev=p.dvc_rev, dvc_path=p.dvc_path)
        # importers: the URI is the run's input in the UI; reimport=False reuses the artifact already recorded for it
        if imports.teacher_uri:
            tasks["import-teacher"] = imported = dsl.importer(artifact_uri=p.teacher_uri, artifact_class=dsl.Model,
                                                              reimport=False, metadata={"role": "teacher"})
            teacher = {"teacher": imported.output}
        if imports.fid_reference_uri:
            tasks["import-fid-reference"] = imported = dsl.importer(
                artifact_uri=p.fid_reference_uri, artifact_class=dsl.Dataset, reimport=False,
                metadata={"role": "FID reference images"})
            reference = {"reference": imported.output}
        with dsl.ParallelFor(p.runs) as run:
            # run.name is the loop channel's own name ("runs-loop-item", the same in every iteration), not the
            # item's "name" key: ask for that sub-variable explicitly
            tasks["distill"] = distilled = c.distill(
                **common, **run_scope, teacher_model=p.teacher_model, run_name=run.__getattr__("name"),
                method=run.method, num_phases=run.num_phases, config_hash=run.config_hash, max_steps=p.max_steps,
                num_gpus=r.gpus if r else 0, prepared=prepared.outputs["prepared"], **teacher)
        tasks["evaluate"] = evaluated = c.evaluate(**common, **run_scope, teacher_model=p.teacher_model,
                                                   eval_steps=p.eval_steps, prepared=prepared.outputs["prepared"],
                                                   loras=dsl.Collected(distilled.outputs["lora"]), **teacher,
                                                   **reference)
        tasks["register"] = c.register(**common, method=p.register_method, num_phases=p.register_phases,
                                       loras=dsl.Collected(distilled.outputs["lora"]),
                                       results=evaluated.outputs["results"])
        for task_name, task in tasks.items():
            task.set_caching_options(cache and CACHING[task_name])
            if task_name.startswith("import-"):
                task.set_display_name(task_name)  # its task is "importer", "importer-2" in the package
            elif r is not None:  # an importer runs no container of ours: nothing to size or mount
                apply(task, r, task_name)

    pipeline.__signature__ = signature
    return dsl.pipeline(name=name, description="PCM distillation: data -> distill per phase count -> evaluate -> "
                        "register")(pipeline)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes in one line (argparse prints the whole usage first), pointing at --help."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not (sep and key):
        raise argparse.ArgumentTypeError(f"{item!r}: expected KEY=VALUE, e.g. "
                                         "nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")
    return key, value


def _argument(item: str) -> tuple[str, object]:
    name, sep, value = item.partition("=")
    try:
        if not (sep and name):
            raise ValueError("no '='")
        return name, json.loads(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{item!r}: expected NAME=JSON, e.g. 'max_steps=100' or "
                                         f"'shard_urls=[\"s3://b/{{00000..00331}}.tar\"]' ({err})") from None


def _gpu_count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a GPU count >= 0")
    return count


def _add_cluster_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--gpus", type=_gpu_count, default=8, help="GPUs of each distill task, one node "
                         "(default 8); 0 = no GPU request in any task (a CPU cluster)")
    command.add_argument("--eval-gpus", type=_gpu_count, metavar="N", help="GPUs of the evaluate task (default: 1 "
                         "unless the params' eval.device is cpu)")
    command.add_argument("--register-gpus", type=_gpu_count, metavar="N", help="GPUs of the register task (default: "
                         "1 unless the params' register.device is cpu)")
    command.add_argument("--node-selector", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                         help="a node label the GPU tasks must have (repeat for several)")
    command.add_argument("--data-pvc", default="pcm-data", help="PVC with shards and teacher weights, mounted at "
                         "/mnt/data (default pcm-data)")
    command.add_argument("--work-pvc", default="pcm-work", help="PVC for checkpoints and caches, mounted at "
                         "/mnt/work (default pcm-work)")
    command.add_argument("--secret", default="pcm-secrets", help="Kubernetes secret whose keys the tasks get as "
                         "env vars, each task only its own (default pcm-secrets)")
    command.add_argument("--queue-name", type=_queue_name, default="", metavar="QUEUE", help="Kueue LocalQueue "
                         "of the distill pods (label kueue.x-k8s.io/queue-name; default: none, not queued)")
    command.add_argument("--no-cache", action="store_true", help="no task reuses a cached result (default: data "
                         "and import tasks do, distill within its run only, evaluate and register never)")


def _add_import_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--teacher-uri", default="", metavar="URI", help="import the teacher (a diffusers "
                         "folder) with dsl.importer from URI (s3://, gs://, minio://; a local path under kfp.local); "
                         "adds the pipeline parameter teacher_uri, which replaces teacher_model")
    command.add_argument("--fid-reference-uri", default="", metavar="URI", help="import a prepared-shards folder "
                         "of FID reference images with dsl.importer (eval.reference_images); adds the pipeline "
                         "parameter fid_reference_uri")


def _queue_name(text: str) -> str:
    problem = queue_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _parser(script: str, name: str, default_params: Path) -> argparse.ArgumentParser:
    prog = f"python pipelines/{script}"
    parser = _Parser(prog=prog, description=f"the {name} Kubeflow pipeline: compile it for "
                                     "`kfp run create`, submit it, or run it here with kfp.local",
                                     epilog=f"example: {prog} compile -o {Path(script).stem}.yaml --gpus 8")
    parser.add_argument("--params", default=str(default_params), help=f"params file whose values become the "
                        f"pipeline's defaults (default: {default_params.relative_to(ROOT)})")
    parser.add_argument("--image", help="project image the components run in (default: $PCM_IMAGE or the "
                        "published one)")
    commands = parser.add_subparsers(dest="command", required=True)
    compile_ = commands.add_parser("compile", help="write the pipeline package for `kfp run create`")
    compile_.add_argument("-o", "--output", required=True, help="output .yaml (the spec patch goes beside it)")
    submit = commands.add_parser("submit", help="compile and submit to a KFP host")
    for command in (compile_, submit):
        _add_cluster_options(command)
    submit.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    submit.add_argument("--experiment", required=True, help="KFP experiment the run belongs to (made if missing)")
    local = commands.add_parser("run", help="run it here with kfp.local (SubprocessRunner, this venv, no cluster)")
    local.add_argument("--local", action="store_true", required=True, help="required: the only runner is kfp.local")
    local.add_argument("--root", default="local_outputs", help="kfp.local pipeline root (artifacts)")
    for command in (compile_, submit, local):
        _add_import_options(command)
    for command in (submit, local):
        command.add_argument("--arg", type=_argument, action="append", default=[], metavar="NAME=JSON",
                             help="a pipeline argument, its value as JSON, e.g. 'max_steps=100' (repeat)")
    return parser


def _resources(args, config) -> Resources:
    """The cluster settings of the compile options; evaluate's and register's GPUs follow the config's devices."""
    sizes = Resources().sizes
    for task, option, device in (("evaluate", args.eval_gpus, config.eval.device),
                                 ("register", args.register_gpus, config.register.device)):
        sizes[task] = replace(sizes[task], gpus=device_gpus(device) if option is None else option)
    return Resources(gpus=args.gpus, node_selector=dict(args.node_selector), data_pvc=args.data_pvc,
                     work_pvc=args.work_pvc, secret=args.secret, sizes=sizes,
                     grace_seconds=config.pipeline.termination_grace_seconds, queue_name=args.queue_name)


def spec_patch_path(package: str | Path) -> Path:
    """Where `compile` writes the cluster's COMPILED_PIPELINE_SPEC_PATCH beside the package: NAME.spec-patch.json."""
    package = Path(package)
    return package.with_name(package.stem + ".spec-patch.json")


def main(name: str, demo: bool, default_params: Path, teacher_model: str, argv: list[str] | None = None,
         script: str = "") -> int:
    """The command line of the pipeline file `script`; a bad params file or option is one line on stderr, exit 2."""
    script = script or f"{name}.py"
    parser = _parser(script, name, default_params)
    args = parser.parse_args(argv)
    try:
        return _run(args, name, demo, teacher_model)
    except (ValueError, OSError) as err:  # ConfigError is a ValueError: the params file, a value in it
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return 2


def _run(args, name: str, demo: bool, teacher_model: str) -> int:
    from pcm.config import config_from_dict, read_params

    if args.image:
        os.environ["PCM_IMAGE"] = args.image  # read when the components are first imported
    params = read_params(args.params)
    config = config_from_dict(params)  # checked here, so a broken params file fails before kfp compiles anything
    # one line of JSON (YAML parses it): kfp writes defaults into the package's header comment, where a multi-line
    # string would break the YAML
    params_text = json.dumps(params)
    arguments = dict(args.arg) if args.command != "compile" else {}
    if "runs" in arguments:  # items of one's own: each gets its config hash, distill's cache key
        arguments["runs"] = with_hashes(arguments["runs"], arguments.get("params", params_text))
    imports = Imports(args.teacher_uri, args.fid_reference_uri)
    if args.command == "run":
        from kfp import local

        # tasks run as subprocesses of this venv; the components package must be importable there as in the image
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(Path(args.root).resolve()))
        run = make_pipeline(name, demo, params_text, teacher_model, None, imports)(**arguments)
        print(json.dumps({"state": str(getattr(run, "state", "SUCCEEDED")), "root": args.root}))
        return 0
    resources = _resources(args, config)
    pipeline = make_pipeline(name, demo, params_text, teacher_model, resources, imports, cache=not args.no_cache)
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
    # enable_caching=False (--no-cache) turns caching off for every task of this run, whatever the package says
    result = client.create_run_from_pipeline_func(pipeline, arguments=arguments, experiment_name=args.experiment,
                                                  enable_caching=False if args.no_cache else None)
    print(json.dumps({"run_id": result.run_id, "experiment": args.experiment, "host": args.host}))
    return 0
