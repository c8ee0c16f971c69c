"""Where a pipeline run keeps its work on the work PVC: work_root/runs/<pipeline run id>/ (checkpoints per distill run,
the evaluation cache). Run names (pcm-m4, ...) repeat in every pipeline run; the run id does not, so a new pipeline
run starts fresh, two concurrent runs never share a folder, and a retried task (same run id) finds its checkpoints.

It lives beside the components, not in pcm/: the library knows nothing of Kubeflow (the README's layout)."""

import re
from pathlib import Path

_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # it names one folder: no '/', no '..', no placeholder


def run_folder(work_root: str, pipeline_run: str, continue_run: str, scratch: str) -> str:
    """work_root/runs/<id>: id = continue_run (an earlier pipeline run's id: continue its distillations) or else
    pipeline_run (this run's id, dsl.PIPELINE_JOB_ID_PLACEHOLDER, the same for every retry of its tasks).
    Without work_root (kfp.local) it is scratch, a folder beside the task's outputs: new for every run."""
    if not work_root:
        if continue_run:
            raise ValueError(f"continue_run={continue_run!r} needs work_root (the work PVC): the runs to continue "
                             "live under work_root/runs/")
        return scratch
    run_id = continue_run or pipeline_run
    if not _RUN_ID.fullmatch(run_id):
        raise ValueError(f"pipeline run id {run_id!r} cannot name a folder (letters, digits, '.', '_', '-'); "
                         "continue_run takes the id of an earlier run, as listed under work_root/runs/")
    runs = Path(work_root) / "runs"
    if continue_run and not (runs / run_id).is_dir():
        known = sorted(p.name for p in runs.iterdir()) if runs.is_dir() else []
        raise FileNotFoundError(f"continue_run={run_id!r}: no folder {runs / run_id}; runs there: {known or 'none'}")
    return str(runs / run_id)
