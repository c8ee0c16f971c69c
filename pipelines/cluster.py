"""What each Kubeflow task gets from the cluster (compile time): volumes, CPU/memory limits, GPUs, retries, the
non-root identity, and only the secret keys it uses.

Two pod-level settings have no field in KFP's task config (kfp-kubernetes 2.17's KubernetesExecutorConfig has
container-level runAsUser/runAsGroup/runAsNonRoot, but no fsGroup and no terminationGracePeriodSeconds), and the KFP
API server's compiler parses each task's Kubernetes config strictly (protojson), so an extra key written into the
package would make `kfp run create` fail. They reach the pods through the one hook KFP gives an administrator: the
API server's COMPILED_PIPELINE_SPEC_PATCH, a patch of every compiled Argo Workflow's spec. `spec_patch` writes it
(`compile` saves it beside the package); each task also carries its values as pod annotations, so the package says
what its pods expect and a cluster policy can check them.
"""

import json
import re
from dataclasses import dataclass, field

# The secret keys by what they open. MLflow artifacts go through the tracking server (`mlflow server` proxies them
# by default), so a tracked task needs the tracking token, not object-store keys.
OBJECT_STORE = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL")
HUB = ("HF_TOKEN",)
MLFLOW = ("MLFLOW_TRACKING_TOKEN",)

# Every stage is an MLflow run (pcm.stages), so every task has the tracking token; beyond it:
TASK_SECRETS = {
    "demo-data": MLFLOW,
    "prepare": OBJECT_STORE + MLFLOW,  # s3:// shard URLs, and the DVC remote of a dvc_repo input
    "demo-teacher": MLFLOW,
    "distill": HUB + MLFLOW,  # a hub-id teacher (gated weights need the token)
    "evaluate": HUB + MLFLOW,  # the teacher's reference samples load the same teacher
    "register": HUB + MLFLOW,  # it loads the LoRA onto its base model (a hub id too) before registering
}

GRACE_ANNOTATION = "pcm-pipelines/termination-grace-seconds"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"  # Kueue admits a labelled workload through that LocalQueue
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


def queue_name_problem(name: str) -> str:
    """What makes `name` unusable as a Kueue queue name (a Kubernetes label value), in one line; empty if nothing."""
    if name and not _LABEL_VALUE.fullmatch(name):
        return (f"queue name {name!r}: a Kubernetes label value (at most 63 letters, digits, '-', '_', '.', starting "
                "and ending with a letter or digit)")
    return ""
FS_GROUP_ANNOTATION = "pcm-pipelines/fs-group"


@dataclass(frozen=True)
class TaskSize:
    """CPU and memory limits of a task (Kubernetes quantities; requests default to the limits) and its GPUs."""

    cpu: str
    memory: str
    gpus: int = 0


def _sizes() -> dict[str, TaskSize]:
    # evaluate generates with the teacher and every LoRA at 1-16 steps; register loads the LoRA onto its base model.
    # Their GPUs follow eval.device / register.device of the params (`device_gpus`, the compile options).
    return {"demo-data": TaskSize("2", "8Gi"), "prepare": TaskSize("16", "64Gi"), "demo-teacher": TaskSize("4", "16Gi"),
            "evaluate": TaskSize("16", "128Gi", gpus=1), "register": TaskSize("4", "32Gi", gpus=1)}


def device_gpus(device: str) -> int:
    """The GPUs a task whose config says `device` asks for by default: a GPU unless the config pins the CPU (auto
    would otherwise fall back to the CPU on a node without one, silently and slowly)."""
    return 0 if device == "cpu" else 1


@dataclass
class Resources:
    """Cluster settings of the tasks. gpus = 0: no accelerator request anywhere (CPU clusters)."""

    gpus: int = 8  # GPUs of the distill task, one node; `accelerate launch --multi_gpu` inside when > 1
    accelerator: str = "nvidia.com/gpu"
    cpu: str = "32"  # CPU and memory limits of the distill task
    memory: str = "480Gi"
    sizes: dict[str, TaskSize] = field(default_factory=_sizes)  # the other tasks' limits, by task name
    shm_size: str = "64Gi"  # Memory emptyDir at /dev/shm (NCCL and DataLoader workers need more than 64 MB)
    data_pvc: str = "pcm-data"  # PVC with shards and teacher weights, mounted at /mnt/data on every task
    work_pvc: str = "pcm-work"  # PVC for checkpoints and caches, mounted at /mnt/work: a retried task resumes there
    secret: str = "pcm-secrets"  # a task sees only its TASK_SECRETS keys of it, as env vars (missing keys: unset)
    node_selector: dict = field(default_factory=dict)  # GPU tasks, e.g. {"nvidia.com/gpu.product": "NVIDIA-H100..."}
    tolerations: tuple[str, ...] = ("nvidia.com/gpu",)  # taint keys tolerated by GPU tasks (Exists, NoSchedule)
    retries: int = 3  # retries of every task: distill resumes from its newest checkpoint, the others redo or reuse
    uid: int = 1000  # the image's user (Dockerfile: useradd --uid 1000 pcm), and its group
    fs_group: int = 1000  # group owning the PVC mounts, so uid 1000 can write them
    grace_seconds: int = 600  # pipeline.termination_grace_seconds: SIGTERM to SIGKILL on the distill pods
    queue_name: str = ""  # Kueue LocalQueue of the distill pods (QUEUE_LABEL); empty = no label, not queued

    def size(self, name: str) -> TaskSize:
        if name == "distill":
            return TaskSize(self.cpu, self.memory, self.gpus)
        if name not in self.sizes:
            raise ValueError(f"no size for task {name!r}; sizes has {sorted(self.sizes)}")
        size = self.sizes[name]
        return size if self.gpus > 0 else TaskSize(size.cpu, size.memory)


def apply(task, r: Resources, name: str) -> None:
    """Everything task `name` needs from the cluster: PVCs, its secret keys, limits, GPUs, retries, identity."""
    from kfp import kubernetes

    kubernetes.mount_pvc(task, pvc_name=r.data_pvc, mount_path="/mnt/data")
    kubernetes.mount_pvc(task, pvc_name=r.work_pvc, mount_path="/mnt/work")
    kubernetes.use_secret_as_env(task, secret_name=r.secret, secret_key_to_env={k: k for k in TASK_SECRETS[name]},
                                 optional=True)
    size = r.size(name)
    task.set_cpu_limit(size.cpu).set_memory_limit(size.memory)
    task.set_retry(num_retries=r.retries, backoff_duration="60s", backoff_factor=2.0)
    kubernetes.set_security_context(task, run_as_user=r.uid, run_as_group=r.uid, run_as_non_root=True)
    kubernetes.add_pod_annotation(task, FS_GROUP_ANNOTATION, str(r.fs_group))
    if size.gpus > 0:
        task.set_accelerator_type(r.accelerator).set_accelerator_limit(size.gpus)
        for key in r.tolerations:
            kubernetes.add_toleration(task, key=key, operator="Exists", effect="NoSchedule")
        for key, value in r.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
    if name == "distill":
        kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=r.shm_size)
        kubernetes.add_pod_annotation(task, GRACE_ANNOTATION, str(r.grace_seconds))
        if r.queue_name:  # only the GPU-hungry task waits for quota; the short CPU tasks around it run at once
            kubernetes.add_pod_label(task, QUEUE_LABEL, r.queue_name)


def spec_patch(r: Resources) -> dict:
    """The KFP API server's COMPILED_PIPELINE_SPEC_PATCH value that gives every pod of a run the grace period and the
    fsGroup. It goes through the Workflow's podSpecPatch, not spec.securityContext: Argo lets a template's pod
    securityContext replace the Workflow's whole, and KFP sets one on its executor templates (a seccomp profile);
    a podSpecPatch is merged into the final pod spec after both."""
    pod = {"terminationGracePeriodSeconds": r.grace_seconds,
           "securityContext": {"fsGroup": r.fs_group, "fsGroupChangePolicy": "OnRootMismatch"}}
    return {"podSpecPatch": json.dumps(pod, separators=(",", ":"))}
