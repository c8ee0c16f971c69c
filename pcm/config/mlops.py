"""Config sections of the pipelines, MLflow tracking and the model registry (`pipeline`, `tracking`, `register`)."""

import re
from dataclasses import dataclass, field
from typing import Literal

from pcm.config.errors import require


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking of every stage: params, metrics by step, artifacts, lineage tags."""

    enabled: bool = True  # false: no MLflow calls at all
    uri: str = ""  # tracking URI; empty = $MLFLOW_TRACKING_URI, else the embedded store sqlite:///mlflow/mlflow.db
    artifact_root: str = ""  # artifact folder of experiments created in a SQLite store; empty = next to the
    #   database file (the embedded store: mlflow/artifacts); a tracking server chooses its own
    experiment: str = "pcm"  # experiment name (created when missing)
    retry_seconds: float = 120.0  # how long a failing store is retried (with backoff) before the run goes on
    #   without it and writes what was not logged to <stage output>/mlflow_unlogged.json
    request_timeout: float = 10.0  # seconds per HTTP request to a tracking server
    close_timeout: float = 30.0  # seconds a stage's end waits for records still being sent; what is left then is
    #   written to <stage output>/mlflow_unlogged.json (a store that is failing gets one more try, not the wait)
    queue_size: int = 10000  # records waiting for delivery, at most; more (a store slower than the training loop)
    #   are written to mlflow_unlogged.json instead, counted and reported, never blocking a step

    def __post_init__(self):
        require(self.retry_seconds >= 0, f"tracking.retry_seconds={self.retry_seconds}: must be >= 0")
        require(self.request_timeout > 0, f"tracking.request_timeout={self.request_timeout}: must be > 0")
        require(self.close_timeout >= 0, f"tracking.close_timeout={self.close_timeout}: must be >= 0")
        require(self.queue_size >= 10, f"tracking.queue_size={self.queue_size}: must be >= 10 (records)")
        require(bool(self.experiment), "tracking.experiment must not be empty")


@dataclass(frozen=True)
class RegisterConfig:
    """`pcm register`: the distilled LoRA as a version of a registered MLflow model, with aliases and a gate."""

    lora: str = "models/pcm/lora"  # exported LoRA folder (pcm distill's train.output_dir/lora)
    model_name: str = "pcm-demo-sd15-4phase"  # registered model name
    eval_metrics: str = "reports/eval/metrics.json"  # pcm evaluate's flat metrics (tags and the gate); may be absent
    gate_metric: str = "pcm-M4/k4/fid_teacher"  # the metrics.json key the promotion to champion is decided on
    gate_direction: Literal["lower", "higher"] = "lower"  # which way is better for gate_metric
    gate_threshold: float = 100.0  # champion only if gate_metric is at most (lower) / at least (higher) this
    # value: decide on the metric itself; ci: on its 95 % interval's cautious end (the upper end when lower is
    # better), which must pass the threshold and beat the champion's value (needs eval.bootstrap_resamples > 0)
    gate_bound: Literal["value", "ci"] = "value"
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where a loaded model generates (pcm sample, the pyfunc)
    output: str = "models/registered.json"  # what `pcm register` did (version, aliases, gate, run), for pipelines

    def __post_init__(self):
        require(bool(self.model_name), "register.model_name must not be empty (e.g. pcm-sdxl-4phase)")


@dataclass(frozen=True)
class DistillRun:
    """One distillation of the pipeline: its method and phase count (the rest comes from distill.*)."""

    method: Literal["pcm", "lcm"] = "pcm"
    num_phases: int = 4

    def __post_init__(self):
        require(self.num_phases >= 1, f"pipeline.distill_runs: num_phases={self.num_phases} must be >= 1")
        require(self.method != "lcm" or self.num_phases == 1, "pipeline.distill_runs: an lcm run has num_phases: 1")

    def overrides(self) -> list[str]:
        """The overrides that make this run from the params. An LCM run is the plain LCM baseline, without the
        adversarial loss, so a params file that turns that loss on for its PCM runs (configs/sdxl-cc3m.yaml) still
        runs its LCM baseline."""
        return [f"distill.method={self.method}", f"distill.num_phases={self.num_phases}",
                *(["adversarial.weight=0"] if self.method == "lcm" else [])]


def _default_runs() -> dict:
    return {"pcm-m1": DistillRun("pcm", 1), "pcm-m2": DistillRun("pcm", 2), "pcm-m4": DistillRun("pcm", 4),
            "lcm": DistillRun("lcm", 1)}


@dataclass(frozen=True)
class PipelineConfig:
    """The DVC and Kubeflow pipelines: one distill stage per entry, writing models/<name>/."""

    distill_runs: dict[str, DistillRun] = field(default_factory=_default_runs)  # name -> method and M
    termination_grace_seconds: int = 600  # Kubernetes' SIGTERM -> SIGKILL window on the distill pods (preemption, a
    #   deleted run): the step in flight ends, then a checkpoint is written. An SDXL one (rank-64 LoRA, ~200 M params,
    #   with its AdamW moments and the discriminator heads: ~2.5 GB fp32) takes ~15 s at 200 MB/s, ~60 s on a 50 MB/s
    #   network PVC; 600 leaves room for slow storage, and a pod that has saved exits at once. torchrun (multi-node)
    #   gets 15 s less to wait for its workers.

    def __post_init__(self):
        require(len(self.distill_runs) > 0, "pipeline.distill_runs: list at least one run")
        require(self.termination_grace_seconds >= 30,
                f"pipeline.termination_grace_seconds={self.termination_grace_seconds}: must be >= 30 (the time to "
                "save a checkpoint after SIGTERM; about 600 for SDXL on network storage)")
        for name in self.distill_runs:
            require(re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) is not None,
                    f"pipeline.distill_runs: run name {name!r} must be lower-case letters, digits and '-' (it names a "
                    "folder, a DVC stage and a Kubeflow task)")
