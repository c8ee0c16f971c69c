"""The distill stage beyond one node: a Kubeflow Trainer TrainJob (or a Kubeflow training-operator PyTorchJob) for
N nodes x G GPUs, with the launch command inside. Generated and validated here, not run (no cluster).

    python pipelines/multinode.py --nodes 4 --gpus-per-node 8 -o distill-4x8.yaml
    kubectl apply -f distill-4x8.yaml

Each node runs `torchrun` with G processes; the operator sets the rendezvous (node rank, master address and port)
and accelerate's Accelerator() picks up the torch.distributed environment, so the same `pcm distill` runs on
N x G GPUs. Checkpoints go to the shared work PVC, so a restarted job resumes (`--resume latest`). The global batch
(train.batch_size) is split over all N x G processes: scale it (or the learning rate) with the node count.
"""

import argparse
import copy
import sys
from pathlib import Path

import yaml


def launch_command(gpus_per_node: int, params: str, nodes_env: str, rank_env: str, extra: list[str]) -> list[str]:
    """sh -c '<torchrun ... -m pcm.cli distill>': the env names differ per operator."""
    torchrun = (f"torchrun --nnodes=${{{nodes_env}}} --nproc_per_node={gpus_per_node} --node_rank=${{{rank_env}}} "
                f"--master_addr=${{MASTER_ADDR}} --master_port=${{MASTER_PORT}} -m pcm.cli distill --params {params} "
                + " ".join(extra))
    resume = "if ls /mnt/work/$RUN/checkpoints/step-* >/dev/null 2>&1; then R='--resume latest'; else R=''; fi; "
    return ["sh", "-c", resume + torchrun + " $R"]


def _pod(image: str, gpus: int, command: list[str], args) -> dict:
    return {
        "containers": [{
            "name": "pytorch", "image": image, "command": command,
            "env": [{"name": "RUN", "value": args.run_name}],
            "envFrom": [{"secretRef": {"name": args.secret, "optional": True}}],
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


def _overrides(args) -> list[str]:
    return [f"train.output_dir=/mnt/work/{args.run_name}", *args.override]


def pytorchjob(args) -> dict:
    """kubeflow.org/v1 PyTorchJob: one Master and nodes - 1 Workers; the operator sets WORLD_SIZE (= nodes here,
    as one pod per node) and RANK (the node rank)."""
    command = launch_command(args.gpus_per_node, args.params, "WORLD_SIZE", "RANK", _overrides(args))
    pod = {"spec": _pod(args.image, args.gpus_per_node, command, args)}
    specs = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": pod}}
    if args.nodes > 1:
        specs["Worker"] = {"replicas": args.nodes - 1, "restartPolicy": "OnFailure", "template": copy.deepcopy(pod)}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": f"pcm-{args.run_name}"},
            "spec": {"runPolicy": {"backoffLimit": args.retries}, "pytorchReplicaSpecs": specs}}


def trainjob(args) -> dict:
    """trainer.kubeflow.org/v1alpha1 TrainJob on the torch-distributed runtime: numNodes pods of G GPUs; the runtime
    sets PET_NNODES / PET_NODE_RANK / PET_MASTER_ADDR / PET_MASTER_PORT, mapped to the torchrun flags."""
    command = launch_command(args.gpus_per_node, args.params, "PET_NNODES", "PET_NODE_RANK", _overrides(args))
    command[-1] = "export MASTER_ADDR=$PET_MASTER_ADDR MASTER_PORT=$PET_MASTER_PORT; " + command[-1]
    pod = _pod(args.image, args.gpus_per_node, command, args)
    container = pod["containers"][0]
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob",
            "metadata": {"name": f"pcm-{args.run_name}"},
            "spec": {"runtimeRef": {"name": "torch-distributed"},
                     "trainer": {"image": args.image, "command": container["command"], "numNodes": args.nodes,
                                 "resourcesPerNode": container["resources"], "env": container["env"]},
                     "podSpecOverrides": [{"targetJobs": [{"name": "node"}], "volumes": pod["volumes"],
                                           "containers": [{"name": "node", "volumeMounts": container["volumeMounts"]}],
                                           "tolerations": pod["tolerations"]}]}}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python pipelines/multinode.py", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--kind", choices=["trainjob", "pytorchjob"], default="trainjob")
    p.add_argument("--image", default="ghcr.io/pcm-pipelines/pcm:0.1.0")
    p.add_argument("--params", default="/mnt/data/configs/sdxl-cc3m.yaml", help="params file inside the pod")
    p.add_argument("--run-name", default="sdxl-pcm-m4", help="names the job and its folder on the work PVC")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--data-pvc", default="pcm-data")
    p.add_argument("--work-pvc", default="pcm-work")
    p.add_argument("--secret", default="pcm-secrets")
    p.add_argument("--shm-size", default="64Gi")
    p.add_argument("--cpu", default="32")
    p.add_argument("--memory", default="480Gi")
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("-o", "--output", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        raise SystemExit("--nodes and --gpus-per-node must be >= 1")
    manifest = trainjob(args) if args.kind == "trainjob" else pytorchjob(args)
    Path(args.output).write_text(yaml.safe_dump(manifest, sort_keys=False, width=10_000))
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
