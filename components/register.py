"""The registration component: one of the distilled LoRAs into the MLflow model registry."""

from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # the image has kfp
def register(params: str, overrides: list, mlflow_uri: str, method: str, num_phases: int,
             loras: Input[List[Model]], results: Input[Artifact], registered: Output[Artifact]):
    """Registers the LoRA of the given method and phase count (pcm.stages.register) with the evaluation's metrics;
    the output records the version, aliases, gate decision and MLflow run."""
    from pcm import stages
    from pcm.config import config_from_yaml

    chosen = stages.lora_with([m.path for m in loras], method, num_phases)  # by each LoRA's own model card
    cfg = config_from_yaml(params, [*overrides, f"register.lora={chosen}", f"register.output={registered.path}",
                                    f"register.eval_metrics={results.path}/metrics.json"], mlflow_uri)
    result = stages.register(cfg)
    registered.metadata.update({k: result[k] for k in ("model_name", "version", "model_uri", "run_id")})
