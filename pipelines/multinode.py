"""The distill stage beyond one node: a Kubeflow Trainer TrainJob (or a Kubeflow training-operator PyTorchJob) for
N nodes x G GPUs, with the launch command inside. Generated and validated here, not run (no cluster).

    python pipelines/multinode.py --nodes 4 --gpus-per-node 8 -o distill-4x8.yaml
    kubectl apply -f distill-4x8.yaml

Each node runs `torchrun` with G processes; the operator sets the rendezvous (node rank, master address and port)
and accelerate's Accelerator() picks up the torch.distributed environment, so the same `pcm distill` runs on
N x G GPUs. The global batch (train.batch_size) is split over all N x G processes: scale it (or the learning rate)
with the node count.

Run identity: each generated manifest is one run, /mnt/work/runs/<run id>/<run name> on the work PVC, and its
objects are named pcm-<run name>-<run id>. A restarted pod or job (the operator's retries) resumes there
(`--resume latest`); a manifest generated anew gets a new run id and starts fresh; `--run-id ID` continues run ID.

Queueing: --queue-name QUEUE labels the job kueue.x-k8s.io/queue-name=QUEUE; Kueue (with its Kubeflow Trainer or
training-operator integration enabled) keeps it suspended until the queue has quota for all of its nodes.

Preemption: the pods get terminationGracePeriodSeconds (pipeline.termination_grace_seconds, --grace-seconds);
torchrun is exec'd, so it receives the kubelet's SIGTERM, forwards it to its workers (they save a checkpoint and
exit 143) and waits for them up to --shutdown-timeout, 15 s less than the grace period, before its own SIGKILL.
"""

import argparse
import copy
import sys
import uuid
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import QUEUE_LABEL, TASK_SECRETS, Resources, queue_name_problem  # noqa: E402

AGENT_MARGIN = 15  # seconds between torchrun's SIGKILL of stuck workers and the kubelet's SIGKILL of the pod


def launch_command(gpus_per_node: int, params: str, nodes_env: str, rank_env: str, extra: list[str],
                   shutdown_timeout: int) -> list[str]:
    """sh -c '<resume check>; exec torchrun ... -m pcm.cli distill' (the env names differ per operator). exec
    replaces the shell by torchrun, so torchrun is the container's PID 1 and gets SIGTERM itself. A shell left
    waiting on torchrun would take the signal instead: as PID 1 it ignores it (no handler), elsewhere it dies of it,
    and either way the workers never hear of it before the SIGKILL."""
    torchrun = (f"exec torchrun --nnodes=${{{nodes_env}}} --nproc_per_node={gpus_per_node} --node_rank=${{{rank_env}}} "
                f"--master_addr=${{MASTER_ADDR}} --master_port=${{MASTER_PORT}} --shutdown-timeout={shutdown_timeout} "
                f"-m pcm.cli distill --params {params} " + " ".join(extra))
    resume = 'if ls "$WORK"/checkpoints/step-* >/dev/null 2>&1; then R="--resume latest"; else R=""; fi; '
    return ["sh", "-c", resume + torchrun + " $R"]


def _work(args) -> str:
    return f"/mnt/work/runs/{args.run_id}/{args.run_name}"


def _name(args) -> str:
    return f"pcm-{args.run_name}-{args.run_id}"


def _env(args) -> list[dict]:
    """WORK (the run's folder) and only the distill task's keys of the secret (cluster.TASK_SECRETS)."""
    secrets = [{"name": key, "valueFrom": {"secretKeyRef": {"name": args.secret, "key": key, "optional": True}}}
               for key in TASK_SECRETS["distill"]]
    return [{"name": "WORK", "value": _work(args)}, *secrets]


def _pod(image: str, gpus: int, command: list[str], args) -> dict:
    ids = Resources()
    return {
        "terminationGracePeriodSeconds": args.grace_seconds,
        "securityContext": {"runAsUser": ids.uid, "runAsGroup": ids.uid, "runAsNonRoot": True,
                            "fsGroup": ids.fs_group, "fsGroupChangePolicy": "OnRootMismatch"},
        "containers": [{
            "name": "pytorch", "image": image, "command": command, "env": _env(args),
            "resources": {"limits": {"nvidia.com/gpu": gpus, "cpu": args.cpu, "memory": args.memory}},
            "volumeMounts": [{"name": "data", "mountPath": "/mnt/data"}, {"name": "work", "mountPath": "/mnt/work"},
                             {"name": "dshm", "mountPath": "/dev/shm"}],
        }],
        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": args.data_pvc}},
                    {"name": "work", "persistentVolumeClaim": {"claimName": args.work_pvc}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": args.shm_size}}],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "restartPolicy": "OnFailure",
    }


def _command(args, nodes_env: str, rank_env: str) -> list[str]:
    extra = [f"train.output_dir={_work(args)}", *args.override]
    return launch_command(args.gpus_per_node, args.params, nodes_env, rank_env, extra,
                          args.grace_seconds - AGENT_MARGIN)


def _metadata(args) -> dict:
    """The job's name, and the Kueue queue label with --queue-name: Kueue then suspends the job until the queue's
    ClusterQueue has quota for all its pods, and admits them together (no half-started gang holding GPUs)."""
    return {"name": _name(args), **({"labels": {QUEUE_LABEL: args.queue_name}} if args.queue_name else {})}


def pytorchjob(args) -> list[dict]:
    """kubeflow.org/v1 PyTorchJob: one Master and nodes - 1 Workers; the operator sets WORLD_SIZE (= nodes here,
    as one pod per node) and RANK (the node rank)."""
    pod = {"spec": _pod(args.image, args.gpus_per_node, _command(args, "WORLD_SIZE", "RANK"), args)}
    specs = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if args.nodes > 1:
        specs["Worker"] = {"replicas": args.nodes - 1, "restartPolicy": "OnFailure", "template": copy.deepcopy(pod)}
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(args),
             "spec": {"runPolicy": {"backoffLimit": args.retries}, "pytorchReplicaSpecs": specs}}]


def trainjob(args) -> list[dict]:
    """trainer.kubeflow.org/v1alpha1 TrainJob of numNodes pods of G GPUs, on a TrainingRuntime of its own: a
    TrainJob's overrides have no grace period or pod securityContext, a runtime's pod template has both. The torch
    plugin sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, mapped to the torchrun flags."""
    command = _command(args, "PET_NNODES", "PET_NODE_RANK")
    command[-1] = "export MASTER_ADDR=$PET_MASTER_ADDR MASTER_PORT=$PET_MASTER_PORT; " + command[-1]
    pod = _pod(args.image, args.gpus_per_node, command, args)
    container = pod.pop("containers")[0]
    pod.pop("restartPolicy")  # the JobSet's Jobs restart failed pods (trainer retries)
    node = {"name": "node", "image": args.image, "volumeMounts": container["volumeMounts"]}
    runtime = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime",
               "metadata": {"name": _name(args), "labels": {"trainer.kubeflow.org/framework": "torch"}},
               "spec": {"mlPolicy": {"numNodes": args.nodes, "torch": {"numProcPerNode": args.gpus_per_node}},
                        "template": {"spec": {"replicatedJobs": [{
                            "name": "node", "replicas": 1,
                            "template": {"metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step":
                                                                 "trainer"}},
                                         "spec": {"backoffLimit": args.retries,
                                                  "template": {"spec": {**pod, "containers": [node]}}}}}]}}}}
    job = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": _metadata(args),
           "spec": {"runtimeRef": {"name": _name(args), "kind": "TrainingRuntime",
                                   "apiGroup": "trainer.kubeflow.org"},
                    "trainer": {"image": args.image, "command": container["command"], "numNodes": args.nodes,
                                "resourcesPerNode": container["resources"], "env": container["env"]}}}
    return [runtime, job]


def parser() -> argparse.ArgumentParser:
    from pcm.config import PipelineConfig

    p = argparse.ArgumentParser(prog="python pipelines/multinode.py", description=__doc__.split("\n")[0],
                                epilog="example: python pipelines/multinode.py --nodes 4 --gpus-per-node 8 "
                                "-o distill-4x8.yaml")
    p.add_argument("--nodes", type=int, required=True, help="nodes (pods) of the job, each running torchrun")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (processes) per node (default 8)")
    p.add_argument("--kind", choices=["trainjob", "pytorchjob"], default="trainjob", help="Kubeflow Trainer's "
                   "TrainJob (default) or the training operator's PyTorchJob")
    p.add_argument("--image", default="ghcr.io/pcm-pipelines/pcm:0.1.0", help="the project image of the pods")
    p.add_argument("--params", default="/mnt/data/configs/sdxl-cc3m.yaml", help="params file inside the pod")
    p.add_argument("--run-name", default="sdxl-pcm-m4", help="the distillation; with the run id it names the job "
                   "and its folder on the work PVC")
    p.add_argument("--run-id", default=uuid.uuid4().hex[:8], help="this run's id (default: a new one, a fresh run); "
                   "an earlier manifest's id continues that run's checkpoints")
    p.add_argument("--grace-seconds", type=int, default=PipelineConfig().termination_grace_seconds,
                   help="terminationGracePeriodSeconds of the pods (pipeline.termination_grace_seconds)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a params override passed to `pcm distill`, e.g. train.max_steps=5000 (repeat)")
    p.add_argument("--data-pvc", default="pcm-data", help="PVC with shards and weights at /mnt/data (default pcm-data)")
    p.add_argument("--work-pvc", default="pcm-work", help="PVC for the run folder at /mnt/work (default pcm-work)")
    p.add_argument("--secret", default="pcm-secrets", help="secret whose distill keys become env vars")
    p.add_argument("--shm-size", default="64Gi", help="size of the Memory emptyDir at /dev/shm (default 64Gi)")
    p.add_argument("--cpu", default="32", help="CPU limit per pod (default 32)")
    p.add_argument("--memory", default="480Gi", help="memory limit per pod (default 480Gi)")
    p.add_argument("--retries", type=int, default=3, help="restarts of failed pods before the job fails (default 3)")
    p.add_argument("--queue-name", default="", metavar="QUEUE", help="Kueue LocalQueue of the job (label "
                   "kueue.x-k8s.io/queue-name; default: none, not queued)")
    p.add_argument("-o", "--output", required=True, help="output manifest .yaml, for `kubectl apply -f`")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = _problem(args)
    if problem:
        print(f"python pipelines/multinode.py: error: {problem}", file=sys.stderr)
        return 2
    manifests = trainjob(args) if args.kind == "trainjob" else pytorchjob(args)
    try:
        Path(args.output).write_text(yaml.safe_dump_all(manifests, sort_keys=False, width=10_000))
    except OSError as err:
        print(f"python pipelines/multinode.py: error: -o {args.output}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(args.output)
    return 0


def _problem(args) -> str:
    """What is wrong with the options, in one line; empty when nothing is."""
    if args.nodes < 1 or args.gpus_per_node < 1:
        return "--nodes and --gpus-per-node must be >= 1"
    if args.grace_seconds <= AGENT_MARGIN:
        return (f"--grace-seconds must be > {AGENT_MARGIN} (torchrun waits {AGENT_MARGIN} s less for its workers' "
                "checkpoint)")
    if not all(c.isalnum() or c == "-" for c in args.run_id) or args.run_id != args.run_id.lower():
        return f"--run-id {args.run_id!r}: lower-case letters, digits and '-' (it names Kubernetes objects)"
    problem = queue_name_problem(args.queue_name)
    return f"--queue-name: {problem}" if problem else ""


if __name__ == "__main__":
    sys.exit(main())
