"""Config sections of MLflow tracking and the model registry (`tracking`, `register`)."""

from dataclasses import dataclass
from typing import Literal

from pcm.config.errors import require


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking of every stage (DESIGN.md §4): params, metrics by step, artifacts, lineage tags."""

    enabled: bool = True  # false: no MLflow calls at all
    uri: str = ""  # tracking URI; empty = $MLFLOW_TRACKING_URI, else the embedded store sqlite:///mlflow/mlflow.db
    artifact_root: str = ""  # artifact folder of experiments created in a SQLite store; empty = next to the
    #   database file (the embedded store: mlflow/artifacts); a tracking server chooses its own
    experiment: str = "pcm"  # experiment name (created when missing)
    retry_seconds: float = 120.0  # how long a failing store is retried (with backoff) before the run goes on
    #   without it and writes what was not logged to <stage output>/mlflow_unlogged.json
    request_timeout: float = 10.0  # seconds per HTTP request to a tracking server

    def __post_init__(self):
        require(self.retry_seconds >= 0, f"tracking.retry_seconds={self.retry_seconds}: must be >= 0")
        require(self.request_timeout > 0, f"tracking.request_timeout={self.request_timeout}: must be > 0")
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
    device: Literal["cpu", "cuda", "auto"] = "cpu"  # where a loaded model generates (pcm sample, the pyfunc)

    def __post_init__(self):
        require(bool(self.model_name), "register.model_name must not be empty (e.g. pcm-sdxl-4phase)")
