"""One function per pipeline stage: the only entry that DVC, the CLI and the Kubeflow components use.

Every stage runs inside an MLflow run (pcm.tracking): the resolved config as params, lineage tags, the stage's
numbers as metrics, its files as artifacts, and <output>/mlflow_run.json naming the run.
"""

from pathlib import Path

from pcm.config import Config
from pcm.tracking import track


def _log(tracker, result: dict, *artifacts: tuple) -> dict:
    """The stage's numbers as metrics and (path, artifact folder) pairs as artifacts, when tracking."""
    if tracker is not None:
        tracker.log_result(result)
        for path, folder in artifacts:
            tracker.artifact(path, folder)
    return result


def _reads_shards(tracker, cfg: Config, context: str) -> None:
    """The prepared shards as an input dataset of the stage's MLflow run (its lineage in the MLflow UI)."""
    if tracker is not None:
        tracker.log_input(cfg, context)


def demo_data(cfg: Config, progress: bool = True) -> dict:
    """The shapes demo world as input shards under cfg.demo.output_dir."""
    from pcm.demo.dataset import write_shapes_shards

    with track(cfg, "demo-data", cfg.demo.output_dir) as tracker:
        return _log(tracker, write_shapes_shards(cfg.demo, cfg.seed, progress))


def prepare(cfg: Config, progress: bool = True) -> dict:
    """Input shards (cfg.data.inputs) -> prepared shards, index.json and stats.json in cfg.data.output_dir."""
    from pcm.data.prepare import prepare as prepare_shards

    with track(cfg, "prepare", cfg.data.output_dir) as tracker:
        result = prepare_shards(cfg.data, cfg.seed, progress)
        return _log(tracker, result, (Path(cfg.data.output_dir) / "stats.json", None))


def demo_teacher(cfg: Config, progress: bool = True) -> dict:
    """Trains the tiny demo teacher on the prepared shapes shards; saves a diffusers pipeline + metrics.json."""
    from pcm.demo.teacher import train_demo_teacher

    out = Path(cfg.demo_teacher.output_dir)
    with track(cfg, "demo-teacher", out) as tracker:  # its first write comes after the pipeline is saved
        _reads_shards(tracker, cfg, "training")
        return _log(tracker, train_demo_teacher(cfg, progress), (out / "metrics.json", None))


def precompute(cfg: Config, progress: bool = True) -> dict:
    """The teacher's VAE latents and text embeddings of every prepared sample, under
    data.output_dir/precomputed/<key> (the key covers the VAE, the text encoders and the prepared data)."""
    from pcm.data.precompute import precompute as run_precompute

    with track(cfg, "precompute", Path(cfg.data.output_dir) / "precomputed") as tracker:
        _reads_shards(tracker, cfg, "preprocessing")
        return _log(tracker, run_precompute(cfg, progress))


def distill(cfg: Config, resume: str | None = None, overwrite: bool = False, processes: int = 1,
            progress: bool = True) -> dict:
    """The teacher (cfg.teacher) distilled into a PCM / LCM LoRA under cfg.train.output_dir; reads this teacher's
    precomputed latents and text states when `pcm precompute` wrote them, else encodes the prepared images and
    captions on the fly.

    The folder is claimed first (pcm.train.manifest): a resume must match its run manifest, a fresh run refuses a
    folder holding another run unless overwrite. A resumed run continues its MLflow run. processes > 1: the ranks
    run under `accelerate launch` behind this process, which passes a SIGTERM on and raises Preempted."""
    import os

    from pcm.data.precompute import find_latents, stored_text
    from pcm.train.manifest import RunManifest, claim

    out = Path(cfg.train.output_dir)
    folder = find_latents(cfg)  # also refuses latents of another teacher
    claim(out, RunManifest.of(cfg, folder or cfg.data.output_dir), resume, overwrite,
          main=os.environ.get("RANK", "0") == "0")
    if processes > 1:  # the launching parent trains nothing: it never imports diffusers or peft
        return _launch(cfg, processes, resume)
    from pcm.data.loader import loader_factory
    from pcm.train.distill import Precomputed
    from pcm.train.distill import distill as run_distill

    with track(cfg, "distill", out, resume=resume is not None) as tracker:
        _reads_shards(tracker, cfg, "training")
        if tracker is not None:
            tracker.start()  # the folder is claimed: MLflow's import and the run's creation overlap the set-up
        precomputed = Precomputed(True, *stored_text(folder)) if folder is not None else None
        result = run_distill(cfg, loader_factory(cfg, folder), resume=resume, sink=tracker, progress=progress,
                             precomputed=precomputed)
        return _log(tracker, result, (out / "samples", "samples"), (out / "metrics.jsonl", None),
                    (out / "lora" / "pcm_config.json", "lora"))


def _launch(cfg: Config, processes: int, resume: str | None) -> dict:
    """`pcm distill` on `processes` ranks (accelerate launch), the folder already claimed: the ranks resume
    ('latest' when this run starts fresh finds no checkpoint and starts at step 0)."""
    from pcm.atomic import write_text
    from pcm.config import config_to_yaml
    from pcm.launch import Preempted, accelerate_command, run_forwarding_signals

    out = Path(cfg.train.output_dir)
    params = write_text(out / "resolved-params.yaml", config_to_yaml(cfg))
    command = accelerate_command(processes, cfg.train.mixed_precision, params, resume or "latest")
    # the ranks get the pod's grace period less a margin for this parent to report (pipeline.termination_grace_seconds)
    code, signum = run_forwarding_signals(command, cfg.pipeline.termination_grace_seconds - 15)
    if signum is not None:
        raise Preempted(f"signal {signum} passed on to the {processes} ranks, which exited {code}; the newest "
                        f"complete checkpoint is in {out / 'checkpoints'}: rerun with --resume latest")
    if code != 0:
        raise RuntimeError(f"accelerate launch of {processes} ranks exited {code}; their error is above")
    return {"processes": processes, "steps": cfg.train.max_steps, "output_dir": str(out),
            "lora": str(out / "lora" / "pytorch_lora_weights.safetensors")}


def evaluate(cfg: Config, progress: bool = True) -> dict:
    """The teacher's DDIM and each LoRA in eval.loras at eval.steps, scored (FID, FID-teacher, trajectory error, step
    consistency, CLIP score, oracle) and reported under eval.output_dir (metrics.json, steps.csv, report.html)."""
    import json

    from pcm.eval.evaluate import evaluate as run_evaluate

    out = Path(cfg.eval.output_dir)
    with track(cfg, "evaluate", out) as tracker:
        _reads_shards(tracker, cfg, "evaluation")
        result = run_evaluate(cfg, progress, world=_shapes_world())
        if tracker is not None:
            tracker.log(0, json.loads((out / "metrics.json").read_text()))  # keys model/k<steps>/metric
        return _log(tracker, result, (out, "report"))


def _shapes_world():
    """The demo's shapes world as evaluation knows it (pcm.eval.known_world): its image and motion oracles and its
    feature net (trained once on the prepared shapes, cached under eval.cache_dir); pcm.eval never imports pcm.demo."""
    from pcm.demo import motion, oracle
    from pcm.eval.known_world import KnownWorld

    def features(cfg: Config, progress: bool):
        from pcm.demo.features import ShapesFeatures, cached_shapes_net

        e = cfg.eval
        net, key = cached_shapes_net(cfg.data.output_dir, e.cache_dir, e.shapes_net_steps, cfg.seed, progress)
        function = ShapesFeatures(net)
        function.key = f"shapes-{key}"
        return function

    return KnownWorld(oracle=oracle.score, motion_oracle=motion.score_clip, features=features)


def convert_inception(source: str, target: str) -> Path:
    """pytorch-fid's FID Inception .pth -> a safetensors file for eval.inception_weights (read with weights_only)."""
    from pcm.eval.inception import convert_weights

    return convert_weights(source, target)


def register(cfg: Config) -> dict:
    """register.lora as a new version of register.model_name in the MLflow registry (candidate alias; champion
    when the gate passes); the same LoRA registered again returns its existing version."""
    import json

    from pcm.registry import register as run_register

    result = run_register(cfg)
    out = Path(cfg.register.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def sample(cfg: Config, prompts: list[str], out: str, **options) -> dict:
    """Image files of prompts from a registered model (model=models:/NAME@ALIAS) or an exported LoRA folder (lora=,
    on the base model its card records, or cfg.teacher with teacher_from="config"); options are the fields of
    pcm.inference.SampleRequest (steps and guidance_scale default to the LoRA's recommended ones). One file per
    prompt: out, or out-<i>.png when there are several."""
    from pcm.inference import SampleRequest, sample_pngs

    return sample_pngs(cfg, SampleRequest(tuple(prompts), out, **options))


def distill_job(cfg: Config, num_processes: int, export_dir: str) -> dict:
    """What a pipeline's distill task does: continue the run in train.output_dir when it holds one with the same
    manifest (a retried task resumes; another run's folder is refused), on num_processes GPUs, then copy the
    exported LoRA folder to export_dir. The work folder is scoped by the pipeline run (components/train.py)."""
    import shutil

    from pcm.models.card import read_card

    out = Path(cfg.train.output_dir)
    resumed = any((out / "checkpoints").glob("step-*"))
    result = distill(cfg, resume="latest", processes=max(num_processes, 1), progress=False)
    shutil.copytree(out / "lora", export_dir, dirs_exist_ok=True)
    card = read_card(export_dir, "the exported LoRA")
    return {**result, "resumed": resumed, "method": card.method, "num_phases": card.num_phases,
            "edges": list(card.edges), "recommended_steps": card.recommended_steps}


def lora_with(folders: list[str], method: str, num_phases: int) -> str:
    """The LoRA folder whose model card says method with num_phases phases (a pipeline's register task picks the
    one it registers so); ValueError listing what the folders hold when none does."""
    from pcm.models.card import read_card

    cards = {folder: read_card(folder, "a distilled LoRA") for folder in folders}
    chosen = [f for f, card in cards.items() if (card.method, card.num_phases) == (method, num_phases)]
    if not chosen:
        held = ", ".join(sorted(f"{c.method} M={c.num_phases}" for c in cards.values())) or "none"
        raise ValueError(f"no distilled LoRA with method={method} num_phases={num_phases} (the pipeline's LoRAs: "
                         f"{held}); check the pipeline's runs")
    return chosen[0]
