"""Hyperparameter search with Katib: a kubeflow.org/v1beta1 Experiment whose trials distill one PCM LoRA and
evaluate it, sweeping the solver's guidance range (distill.w_min, distill.w_max), the number of phases, the learning
rate and the adversarial weight, minimizing fid_teacher at the target step count.

    python pipelines/tune.py --params configs/sdxl-cc3m.yaml -o tune.yaml --steps 4 --max-trials 24
    kubectl apply -f tune.yaml                    # a ConfigMap with the params file, then the Experiment
    python pipelines/tune.py --params tiny.yaml --dry-run --work /tmp/tune    # two trials' commands, here

A trial is a batch/v1 Job: `pcm distill` runs as its init container (on --gpus GPUs, into the trial's emptyDir), then
`pcm evaluate --katib-metric fid_teacher@K` as its primary container scores that LoRA at K steps only and prints
`fid_teacher=<value>` last, the `name=value` line Katib's StdOut metrics collector reads. The params file travels in
a ConfigMap, so what the trials run is what was checked here; the prepared shards and the teacher are the paths the
params name (the data PVC at /mnt/data). The teacher's reference samples are cached on the work PVC, shared by all
trials of the experiment (its cache key is the teacher, prompts, seeds and step count, never a trial's value).
--dry-run draws two trials from the same search space and runs their containers' commands on this machine, with the
pod's paths mapped into --work: the same argv, the same substitution of Katib's ${trialParameters.*}.
"""

import argparse
import json
import math
import random
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import QUEUE_LABEL, TASK_SECRETS, Resources, queue_name_problem  # noqa: E402

PROG = "python pipelines/tune.py"
PARAMS_PATH = "/etc/pcm/params.yaml"  # the ConfigMap's params file inside a trial's pod
TRIAL_DIR = "/trial"  # the trial's emptyDir: its checkpoints, LoRA and report (a trial is disposable)
WORK_DIR = "/mnt/work"  # the work PVC: the evaluation cache that all trials of an experiment share
METRIC = "fid_teacher"  # the objective: FID of the LoRA's samples against the teacher's, lower is better
# Katib's StdOut collector's default filter: a line's `name=value` pairs (pkg/metricscollector/v1beta1/common)
KATIB_FILTER = re.compile(r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)")
# Katib parameter -> (its trial parameter, the params key it sets)
SWEPT = {"w-min": ("wMin", "distill.w_min"), "w-max": ("wMax", "distill.w_max"),
         "num-phases": ("numPhases", "distill.num_phases"), "learning-rate": ("learningRate", "train.learning_rate"),
         "adversarial-weight": ("adversarialWeight", "adversarial.weight")}


@dataclass(frozen=True)
class Range:
    """A continuous parameter's feasible interval, sampled uniformly or log-uniformly."""

    low: float
    high: float
    log: bool = False

    def feasible(self) -> dict:
        space = {"min": f"{self.low:.6g}", "max": f"{self.high:.6g}"}
        return {**space, "distribution": "logUniform"} if self.log else space

    def draw(self, rng: random.Random) -> float:
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


@dataclass(frozen=True)
class Space:
    """What the experiment sweeps. w_min's interval ends where w_max's begins, so every draw has w_min <= w_max."""

    w_min: Range
    w_max: Range
    num_phases: tuple[int, ...]
    learning_rate: Range
    adversarial_weight: Range

    def parameters(self) -> list[dict]:
        """The Experiment's spec.parameters."""
        ranges = {"w-min": self.w_min, "w-max": self.w_max, "learning-rate": self.learning_rate,
                  "adversarial-weight": self.adversarial_weight}
        out = [{"name": name, "parameterType": "double", "feasibleSpace": r.feasible()} for name, r in ranges.items()]
        return [*out, {"name": "num-phases", "parameterType": "discrete",
                       "feasibleSpace": {"list": [str(m) for m in self.num_phases]}}]

    def draw(self, rng: random.Random) -> dict[str, str]:
        """One trial's assignment, as Katib gives it (strings), for a dry run."""
        values = {"w-min": self.w_min.draw(rng), "w-max": self.w_max.draw(rng),
                  "learning-rate": self.learning_rate.draw(rng),
                  "adversarial-weight": self.adversarial_weight.draw(rng)}
        return {**{k: f"{v:.6g}" for k, v in values.items()}, "num-phases": str(rng.choice(self.num_phases))}

    def corners(self) -> list[dict[str, str]]:
        """Assignments at the ends of every range, with each phase count: what must load as a config."""
        ends = [{"w-min": f"{self.w_min.low!r}", "w-max": f"{self.w_max.high!r}", "learning-rate":
                 f"{self.learning_rate.low!r}", "adversarial-weight": f"{self.adversarial_weight.low!r}"},
                {"w-min": f"{self.w_min.high!r}", "w-max": f"{self.w_max.low!r}", "learning-rate":
                 f"{self.learning_rate.high!r}", "adversarial-weight": f"{self.adversarial_weight.high!r}"}]
        return [{**end, "num-phases": str(m)} for end in ends for m in self.num_phases]


def default_space(cfg) -> Space:
    """A sweep around the params' own values: the guidance range widened by 2 on each side and split at its middle,
    the learning rate within 10x either way, the phase counts 1, 2, 4, 8 the solver grid allows, the adversarial
    weight from 0 (off) to twice the params' (at least 0.2)."""
    d = cfg.distill
    middle = (d.w_min + d.w_max) / 2
    lr = cfg.train.learning_rate
    return Space(w_min=Range(max(0.0, d.w_min - 2), middle), w_max=Range(middle, d.w_max + 2),
                 num_phases=tuple(m for m in (1, 2, 4, 8) if m <= d.num_solver_steps),
                 learning_rate=Range(lr / 10, lr * 10, log=True),
                 adversarial_weight=Range(0.0, max(0.2, 2 * cfg.adversarial.weight)))


def trial_overrides() -> list[str]:
    """The params overrides of Katib's trial parameters, as they appear in the trial's argv."""
    return [f"{key}=${{trialParameters.{trial}}}" for trial, key in SWEPT.values()]


def commands(args) -> tuple[list[str], list[str]]:
    """(distill argv, evaluate argv) of a trial, with Katib's ${trialParameters.*} still in them. Each is an MLflow
    run when --mlflow-uri (or the params' tracking.uri) names a store; otherwise tracking is off, as the embedded
    store would sit beside the params file, in the read-only ConfigMap."""
    lora = f"{TRIAL_DIR}/run/lora"
    tracking = [f"tracking.uri={args.mlflow_uri}"] if args.mlflow_uri else [] if args.tracked else \
        ["tracking.enabled=false"]
    distill = ["pcm", "distill", "--params", PARAMS_PATH, "--overwrite",
               *(["--processes", str(args.gpus)] if args.gpus > 1 else []),
               "distill.method=pcm", *trial_overrides(), f"train.output_dir={TRIAL_DIR}/run",
               *([f"train.max_steps={args.max_steps}"] if args.max_steps else []), *tracking, *args.override]
    evaluate = ["pcm", "evaluate", "--params", PARAMS_PATH, "--katib-metric", f"{METRIC}@{args.steps}",
                f"eval.loras={json.dumps([lora])}", f"eval.steps=[{args.steps}]", f"eval.output_dir={TRIAL_DIR}/eval",
                f"eval.cache_dir={WORK_DIR}/katib/{args.name}/eval-cache", *tracking, *args.override]
    return distill, evaluate


def _container(name: str, command: list[str], args, gpus: int) -> dict:
    env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": key, "optional": True}}}
           for key in dict.fromkeys(TASK_SECRETS["distill"] + TASK_SECRETS["evaluate"])]
    limits = {"cpu": args.cpu, "memory": args.memory, **({"nvidia.com/gpu": gpus} if gpus else {})}
    return {"name": name, "image": args.image, "command": command, "env": env, "resources": {"limits": limits},
            "volumeMounts": [{"name": "params", "mountPath": str(Path(PARAMS_PATH).parent), "readOnly": True},
                             {"name": "data", "mountPath": "/mnt/data", "readOnly": True},
                             {"name": "work", "mountPath": WORK_DIR}, {"name": "trial", "mountPath": TRIAL_DIR},
                             {"name": "dshm", "mountPath": "/dev/shm"}]}


def trial_job(args) -> dict:
    """The trial's batch/v1 Job: distill as the init container, evaluate (Katib's primary container) after it."""
    distill, evaluate = commands(args)
    ids = Resources()
    pod = {"restartPolicy": "Never",
           "securityContext": {"runAsUser": ids.uid, "runAsGroup": ids.uid, "runAsNonRoot": True,
                               "fsGroup": ids.fs_group, "fsGroupChangePolicy": "OnRootMismatch"},
           # the pod holds max(init, main) GPUs: distill's all, then evaluate (one device) within them
           "initContainers": [_container("distill", distill, args, args.gpus)],
           "containers": [_container("evaluate", evaluate, args, min(args.gpus, 1))],
           "volumes": [{"name": "params", "configMap": {"name": _configmap_name(args)}},
                       {"name": "data", "persistentVolumeClaim": {"claimName": args.data_pvc, "readOnly": True}},
                       {"name": "work", "persistentVolumeClaim": {"claimName": args.work_pvc}},
                       {"name": "trial", "emptyDir": {}},
                       {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm_size}}]}
    if args.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    labels = {QUEUE_LABEL: args.queue_name} if args.queue_name else {}  # Kueue's batch/Job integration
    # sidecar.istio.io/inject: Katib's documented setting for trial pods, whose mesh sidecar would keep a Job running
    return {"apiVersion": "batch/v1", "kind": "Job", **({"metadata": {"labels": labels}} if labels else {}),
            "spec": {"backoffLimit": 0, "template": {"metadata": {"annotations": {"sidecar.istio.io/inject": "false"}},
                                                     "spec": pod}}}


def _configmap_name(args) -> str:
    return f"{args.name}-params"


def manifests(args, params_text: str, space: Space) -> list[dict]:
    """[the ConfigMap holding the params file, the Katib Experiment]."""
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": _configmap_name(args)},
                 "data": {Path(PARAMS_PATH).name: params_text}}
    experiment = {
        "apiVersion": "kubeflow.org/v1beta1", "kind": "Experiment", "metadata": {"name": args.name},
        "spec": {
            "objective": {"type": "minimize", "objectiveMetricName": METRIC,
                          "metricStrategies": [{"name": METRIC, "value": "latest"}]},
            "algorithm": {"algorithmName": args.algorithm},
            "parallelTrialCount": args.parallel, "maxTrialCount": args.max_trials,
            "maxFailedTrialCount": args.max_failed,
            "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
            "parameters": space.parameters(),
            "trialTemplate": {
                "primaryContainerName": "evaluate", "retain": False,
                "trialParameters": [{"name": trial, "reference": name, "description": f"{key} of the trial"}
                                    for name, (trial, key) in SWEPT.items()],
                "trialSpec": trial_job(args)}}}
    return [configmap, experiment]


def check_space(params_text: str, space: Space, args) -> None:
    """Every corner of the space loads as a config (ConfigError otherwise), before a cluster spends a GPU on it."""
    from pcm.config import config_from_yaml

    if space.w_min.high > space.w_max.low:
        raise ValueError(f"--w-min's upper end {space.w_min.high} is above --w-max's lower end {space.w_max.low}: a "
                         "trial could draw w_min > w_max")
    distill, _ = commands(args)
    for corner in space.corners():
        overrides = [a for a in substitute(distill, corner) if "=" in a and not a.startswith("-")]
        config_from_yaml(params_text, overrides)
    if args.steps not in range(1, 1001):
        raise ValueError(f"--steps {args.steps}: a step count in [1, 1000]")


def substitute(argv: list[str], values: dict[str, str]) -> list[str]:
    """argv with ${trialParameters.<trial>} replaced by the assignment's values, as Katib fills its template."""
    by_trial = {SWEPT[name][0]: value for name, value in values.items()}
    return [re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: by_trial[m.group(1)], a) for a in argv]


def local_argv(argv: list[str], params: Path, trial: Path, work: Path) -> list[str]:
    """A container's argv on this machine: the pod's paths mapped into the dry run's folders, `pcm` this venv's."""
    moves = [(PARAMS_PATH, str(params)), (TRIAL_DIR + "/", f"{trial}/"), (WORK_DIR + "/", f"{work}/")]
    out = []
    for a in argv[1:]:
        for pod_path, here in moves:
            a = a.replace(pod_path, here)
        out.append(a)
    return [sys.executable, "-m", "pcm.cli", *out]


def dry_run(args, params: Path, space: Space) -> list[dict]:
    """Two trials (--trials) drawn from the space, each container's command run here in order; their metric lines
    parsed as Katib's collector does. Returns one row per trial: its assignment and fid_teacher."""
    rng, rows = random.Random(args.seed), []
    work = Path(args.work).resolve()
    distill, evaluate = commands(args)
    for i in range(args.trials):
        values = space.draw(rng)
        trial = work / f"trial-{i}"
        for name, argv in (("distill", distill), ("evaluate", evaluate)):
            done = subprocess.run(local_argv(substitute(argv, values), params, trial, work), capture_output=True,
                                  text=True)
            (trial / f"{name}.log").parent.mkdir(parents=True, exist_ok=True)
            (trial / f"{name}.log").write_text(done.stdout + done.stderr)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise RuntimeError(f"trial {i} {name} exited {done.returncode}: {tail} (log: {trial}/{name}.log)")
        found = [float(m.group(2)) for line in done.stdout.splitlines() for m in KATIB_FILTER.finditer(line)
                 if m.group(1) == METRIC]
        if not found:
            raise RuntimeError(f"trial {i}: no {METRIC}=<value> line in evaluate's stdout ({trial}/evaluate.log)")
        rows.append({**values, METRIC: found[-1]})
    return rows


def _range(text: str, log: bool = False) -> Range:
    low, sep, high = text.partition(":")
    try:
        r = Range(float(low), float(high), log) if sep else None
    except ValueError:
        r = None
    if r is None or not (r.low <= r.high) or r.low < 0 or (log and r.low <= 0):
        lowest = "0 < LOW" if log else "0 <= LOW"
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW:HIGH, {lowest} <= HIGH")
    return r


def _phases(text: str) -> tuple[int, ...]:
    try:
        phases = tuple(int(m) for m in text.split(","))
    except ValueError:
        phases = ()
    if not phases or min(phases) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected phase counts >= 1, e.g. 1,2,4")
    return phases


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].replace("\n", " "),
                                epilog=f"example: {PROG} --params configs/sdxl-cc3m.yaml -o tune.yaml --steps 4")
    p.add_argument("--params", required=True, help="params file of the trials (it travels in a ConfigMap); its "
                   "values centre the default search space")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", help="output manifests .yaml (ConfigMap + Experiment), for `kubectl apply -f`")
    out.add_argument("--dry-run", action="store_true", help="run --trials trials' commands here instead, in --work")
    p.add_argument("--name", default="pcm-tune", help="the Experiment's name (default pcm-tune)")
    p.add_argument("--steps", type=int, default=4, help="sampling steps the objective is measured at (default 4)")
    p.add_argument("--max-steps", type=int, default=0, help="train.max_steps of each trial (default: the params')")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a params override of every trial's distill and evaluate, e.g. eval.num_prompts=500 (repeat)")
    p.add_argument("--w-min", type=_range, metavar="LOW:HIGH", help="range of distill.w_min (default: the params' "
                   "w_min - 2 up to the middle of its guidance range)")
    p.add_argument("--w-max", type=_range, metavar="LOW:HIGH", help="range of distill.w_max (default: from that "
                   "middle up to the params' w_max + 2)")
    p.add_argument("--phases", type=_phases, metavar="M,M,...", help="phase counts (default: 1,2,4,8 up to N)")
    p.add_argument("--learning-rate", type=lambda t: _range(t, log=True), metavar="LOW:HIGH",
                   help="range of train.learning_rate, log-uniform (default: the params' / 10 up to x 10)")
    p.add_argument("--adversarial-weight", type=_range, metavar="LOW:HIGH", help="range of adversarial.weight "
                   "(default: 0 up to twice the params', at least 0.2)")
    p.add_argument("--algorithm", choices=["tpe", "random", "bayesianoptimization"], default="tpe",
                   help="Katib's search algorithm (default tpe)")
    p.add_argument("--max-trials", type=int, default=24, help="trials in all (default 24)")
    p.add_argument("--parallel", type=int, default=2, help="trials at once (default 2)")
    p.add_argument("--max-failed", type=int, default=3, help="failed trials before the experiment fails (default 3)")
    p.add_argument("--image", default="ghcr.io/pcm-pipelines/pcm:0.1.0", help="the project image of the trials")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per trial (default 8; 0 = CPU)")
    p.add_argument("--cpu", default="32", help="CPU limit of each container (default 32)")
    p.add_argument("--memory", default="480Gi", help="memory limit of each container (default 480Gi)")
    p.add_argument("--shm-size", default="64Gi", help="size of the Memory emptyDir at /dev/shm (default 64Gi)")
    p.add_argument("--data-pvc", default="pcm-data", help="PVC with shards and weights at /mnt/data, read-only")
    p.add_argument("--work-pvc", default="pcm-work", help="PVC at /mnt/work: the evaluation cache shared by trials")
    p.add_argument("--secret", default="pcm-secrets", help="secret whose distill and evaluate keys become env vars")
    p.add_argument("--mlflow-uri", default="", metavar="URI", help="MLflow tracking server of the trials' runs "
                   "(default: the params' tracking.uri; with neither, the trials track nothing)")
    p.add_argument("--queue-name", default="", metavar="QUEUE", help="Kueue LocalQueue of the trial Jobs (label "
                   "kueue.x-k8s.io/queue-name; default: none)")
    p.add_argument("--trials", type=int, default=2, help="--dry-run: trials to run here (default 2)")
    p.add_argument("--work", default="tune-dry-run", help="--dry-run: folder of the trials' outputs")
    p.add_argument("--seed", type=int, default=0, help="--dry-run: seed of the trials' draws")
    p.set_defaults(tracked=False)  # whether the params name a tracking store of their own (set from them in _run)
    return p


def _problem(args) -> str:
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", args.name):
        return f"--name {args.name!r}: lower-case letters, digits and '-', at most 40 (it names Kubernetes objects)"
    if min(args.max_trials, args.parallel, args.trials) < 1 or args.max_failed < 0 or args.max_steps < 0:
        return "--max-trials, --parallel and --trials must be >= 1, --max-failed and --max-steps >= 0"
    if args.gpus < 0:
        return "--gpus must be >= 0"
    problem = queue_name_problem(args.queue_name)
    return f"--queue-name: {problem}" if problem else ""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        problem = _problem(args)
        if problem:
            raise ValueError(problem)
        return _run(args)
    except (ValueError, OSError, RuntimeError) as err:  # ConfigError is a ValueError
        print(f"{PROG}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from dataclasses import replace

    from pcm.config import config_from_yaml, read_params

    params_text = yaml.safe_dump(read_params(args.params), sort_keys=False)
    cfg = config_from_yaml(params_text, args.override)
    args.tracked = cfg.tracking.enabled and bool(cfg.tracking.uri)  # a store of the params' own, not the embedded one
    space = default_space(cfg)
    chosen = {"w_min": args.w_min, "w_max": args.w_max, "num_phases": args.phases,
              "learning_rate": args.learning_rate, "adversarial_weight": args.adversarial_weight}
    space = replace(space, **{k: v for k, v in chosen.items() if v is not None})
    check_space(params_text, space, args)
    if args.dry_run:
        if args.gpus > 1:
            args.gpus = 1  # a dry run is one process: no accelerate launch of GPUs this machine may not have
        for row in dry_run(args, Path(args.params).resolve(), space):
            print(json.dumps(row))
        return 0
    Path(args.output).write_text(yaml.safe_dump_all(manifests(args, params_text, space), sort_keys=False,
                                                    width=10_000))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
