"""The evaluation component: the step table as Metrics, the report as HTML, the table as Markdown."""

from typing import List

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # the image has kfp
def evaluate(params: str, overrides: list, mlflow_uri: str, teacher_model: str, eval_steps: list, work_root: str,
             pipeline_run: str, continue_run: str, prepared: Input[Dataset], loras: Input[List[Model]],
             results: Output[Artifact], metrics: Output[Metrics], report: Output[HTML], table: Output[Markdown],
             teacher: Input[Model] = None, reference: Input[Dataset] = None):
    """Every LoRA and the teacher's DDIM (pcm.stages.evaluate; eval_steps, when given, replaces eval.steps); the
    teacher reference cache lives in the pipeline run's folder (work_root/runs/<id>, a PVC in a cluster), so a
    retried evaluation, or one of a continued run, reuses it, and concurrent runs never write the same files.
    reference: an imported prepared-shards folder of FID reference images (eval.reference_images)."""
    import json
    import shutil

    from components.workdir import run_folder
    from pcm import stages
    from pcm.config import config_from_yaml

    work = run_folder(work_root, pipeline_run, continue_run, results.path + "-work")
    cfg = config_from_yaml(params, [*overrides, f"teacher.model={teacher.path if teacher else teacher_model}",
                                    f"data.output_dir={prepared.path}", f"eval.output_dir={results.path}",
                                    f"eval.cache_dir={work}/eval-cache",
                                    f"eval.loras={json.dumps([m.path for m in loras])}",
                                    *([f"eval.steps={json.dumps(eval_steps)}"] if eval_steps else []),
                                    *([f"eval.reference_images={reference.path}"] if reference else [])], mlflow_uri)
    stages.evaluate(cfg, progress=False)
    for key, value in json.loads(open(f"{results.path}/metrics.json").read()).items():
        metrics.log_metric(key, value)
    shutil.copy(f"{results.path}/report.html", report.path)
    shutil.copy(f"{results.path}/steps.md", table.path)
