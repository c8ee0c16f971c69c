"""Training components: the demo teacher, and one distillation (PCM or LCM; several GPUs with accelerate)."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # the image has kfp
def demo_teacher(params: str, overrides: list, mlflow_uri: str, prepared: Input[Dataset], teacher: Output[Model]):
    """The tiny demo teacher trained on the prepared shapes (pcm.stages.demo_teacher), as a diffusers pipeline."""
    from pcm import stages
    from pcm.config import config_from_yaml

    cfg = config_from_yaml(params, [*overrides, f"data.output_dir={prepared.path}",
                                    f"demo_teacher.output_dir={teacher.path}"], mlflow_uri)
    result = stages.demo_teacher(cfg, progress=False)
    teacher.metadata.update({k: result[k] for k in ("vae_psnr_db", "main_colour_acc", "main_kind_acc")})


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # the image has kfp
def distill(params: str, overrides: list, mlflow_uri: str, teacher_model: str, run_name: str, method: str,
            num_phases: int, config_hash: str, max_steps: int, num_gpus: int, work_root: str, pipeline_run: str,
            continue_run: str, prepared: Input[Dataset], lora: Output[Model], teacher: Input[Model] = None):
    """One distillation (pcm.stages.distill_job): checkpoints under work_root/runs/<pipeline run id>/<run_name> (a
    PVC in a cluster: a retried task resumes there, a new pipeline run starts fresh; continue_run names an earlier
    run's id to continue its checkpoints), `accelerate launch` on num_gpus GPUs when > 1; the exported LoRA folder
    is the output. max_steps > 0 overrides train.max_steps. config_hash (of the run's params, method and phases)
    is in KFP's cache key and the LoRA's metadata: a cached result is never one of other params."""
    from components.workdir import run_folder
    from pcm import stages
    from pcm.config import config_from_yaml
    from pcm.config.mlops import DistillRun

    work = f"{run_folder(work_root, pipeline_run, continue_run, lora.path + '-work')}/{run_name}"
    cfg = config_from_yaml(params, [*overrides, f"teacher.model={teacher.path if teacher else teacher_model}",
                                    f"data.output_dir={prepared.path}", *DistillRun(method, num_phases).overrides(),
                                    f"train.output_dir={work}",
                                    *([f"train.max_steps={max_steps}"] if max_steps > 0 else [])], mlflow_uri)
    result = stages.distill_job(cfg, num_gpus, lora.path)
    # method, phases and edges from the LoRA's card
    lora.metadata.update({"run_name": run_name, "config_hash": config_hash, **result})
