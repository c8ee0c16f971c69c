"""The MLflow model registry: `pcm register` (a distilled LoRA as a model version, with aliases and a promotion gate)
and loading it back (`pcm sample --model models:/NAME@champion`).

A version is a pyfunc model that carries the LoRA folder and pcm's own code (code_paths), references the base model
(a local directory, made absolute, or a hub id) and samples with pcm's scheduler over the LoRA's trained edges: a
DataFrame of prompts (columns prompt, negative_prompt, steps, guidance_scale, seed) in, PNG bytes out. The same run
also holds the LoRA in the `mlflow.diffusers` flavor (LoRA + base model reference, for
`mlflow.diffusers.load_model(uri).load_pipeline()`); that flavor's generic pyfunc samples with the base pipeline's
own scheduler, which does not visit PCM's edges, so the registered version is ours.

Aliases, never stages: `candidate` on every new version; `champion` moves only when the gate passes (the gate
metric within the threshold and not worse than the current champion's). Registering the same LoRA again (same
file digest) returns the existing version instead of a duplicate.
"""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from pcm.config import Config, TeacherConfig
from pcm.data.digest import digest
from pcm.eval.generate import generate_pngs, read_lora_config
from pcm.models.lora import DIFFUSERS_FILE
from pcm.tracking import RUN_FILE, experiment, lineage_tags, tracking_uri

COLUMNS = {"prompt": str, "negative_prompt": str, "steps": int, "guidance_scale": float, "seed": int}
ADAPTER = "pcm"


class PCMPipelineModel(PythonModel):
    """The registered pyfunc: base model + LoRA + pcm's sampler. model_config: base_model, family, resolution,
    dtype, device (override base_model at load time when the base moved)."""

    def load_context(self, context):
        from pcm.models.families import load_teacher
        from pcm.models.lora import load_lora

        c = context.model_config
        self.teacher = load_teacher(TeacherConfig(family=c["family"], model=c["base_model"], dtype=c.get(
            "dtype", "float32"), motion_adapter=c.get("motion_adapter", "")), c.get("device", "cpu"))
        load_lora(self.teacher.unet, context.artifacts["lora"], ADAPTER)
        self.meta = read_lora_config(context.artifacts["lora"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        if "prompt" not in model_input:
            raise ValueError(f"the input needs a 'prompt' column; optional: {', '.join(list(COLUMNS)[1:])}")
        return pd.DataFrame({"image": generate_pngs(self.teacher, self.meta, ADAPTER, model_input.to_dict("records"))})


def _client(cfg: Config):
    """An MlflowClient that answers; otherwise a RuntimeError naming the URI and saying nothing was lost."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg.tracking)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(cfg.tracking.request_timeout))))
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:
        raise RuntimeError(f"cannot reach the MLflow tracking store at {uri} ({type(err).__name__}: {err}). Nothing "
                           f"was registered; the LoRA ({cfg.register.lora}) and the evaluation metrics "
                           f"({cfg.register.eval_metrics}) are unchanged on disk. Start the server (or fix "
                           "tracking.uri / MLFLOW_TRACKING_URI) and run `pcm register` again") from err
    return client


@contextmanager
def tracking_store(uri: str):
    """MLflow's fluent API (start_run, log_model, load_model) pointed at uri inside the block only:
    mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which must not outlive the call."""
    previous_env, previous_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def _base_model(model: str) -> str:
    """A local teacher directory as an absolute path (the registry outlives the working directory); hub ids as is."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def version_tags(cfg: Config, meta: dict, metrics: dict, sha: str) -> dict[str, str]:
    label = "lcm" if meta["method"] == "lcm" else f"pcm-M{meta['num_phases']}"
    key_metrics = {f"eval.{k.removeprefix(label + '/')}": v for k, v in metrics.items()
                   if k.startswith(f"{label}/k{meta['recommended_steps']}/")}
    return {"pcm.family": meta["family"], "pcm.method": meta["method"], "pcm.phases": meta["num_phases"],
            "pcm.edges": json.dumps(meta["edges"]), "pcm.N": meta["num_solver_steps"], "pcm.guidance": meta["guidance"],
            "pcm.recommended_steps": meta["recommended_steps"],
            "pcm.recommended_guidance_scale": meta["recommended_guidance_scale"],
            "pcm.recommended_scheduler": meta["recommended_scheduler"],
            "pcm.sampling_timesteps": json.dumps(meta["sampling_timesteps"]), "pcm.lora_sha256": sha,
            **key_metrics, **lineage_tags(cfg, "register")}


def model_card(name: str, meta: dict, base: str) -> str:
    video = f" (clips of {meta['frames']} frames: `num_frames={meta['frames']}`)" if "frames" in meta else ""
    return f"""# {name}

A {meta['method'].upper()} LoRA distilled from `{base}` ({meta['family']}) with pcm-pipelines: {meta['num_phases']}
phase(s) over a {meta['num_solver_steps']}-step solver grid, guidance variant `{meta['guidance']}`.

**Sampling as trained:** {meta['recommended_steps']} steps at CFG {meta['recommended_guidance_scale']}, visiting
exactly the timesteps {meta['sampling_timesteps']} ({meta['recommended_scheduler']}).

```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}@champion")   # base + LoRA + pcm's sampler
png = model.predict(pd.DataFrame({{"prompt": ["a red circle in the center on a gray background"], "seed": [0]}}))
```

With diffusers directly: `pipe = {_diffusers_pipeline(meta, base)}`{video},
`pipe.load_lora_weights(<the version's artifacts>/artifacts/lora)`, then a `TCDScheduler` with
`timesteps={meta['sampling_timesteps'][:-1]}` and `gamma=0` (deterministic PCM), or `pcm sample --model ...`.
"""


def _diffusers_pipeline(meta: dict, base: str) -> str:
    """The diffusers line that builds the base pipeline the LoRA goes into."""
    if meta.get("motion_adapter"):
        adapter = _base_model(meta["motion_adapter"])
        return (f'AnimateDiffPipeline.from_pretrained("{base}", '
                f'motion_adapter=MotionAdapter.from_pretrained("{adapter}"))')
    if meta["family"] == "animatediff":
        return f'AnimateDiffPipeline.from_pretrained("{base}")'
    return f'DiffusionPipeline.from_pretrained("{base}")'


def _gate(client, cfg: Config, metrics: dict) -> tuple[bool, str, float | None]:
    """(promote, reason, value) for the champion alias."""
    r = cfg.register
    value = metrics.get(r.gate_metric)
    if value is None:
        return False, f"{r.gate_metric} not in {r.eval_metrics} (run pcm evaluate first)", None
    better = (lambda a, b: a <= b) if r.gate_direction == "lower" else (lambda a, b: a >= b)
    if not better(value, r.gate_threshold):
        return False, f"{r.gate_metric}={value:.4g} misses the threshold {r.gate_threshold:g}", value
    try:
        champion = client.get_model_version_by_alias(r.model_name, "champion")
    except Exception:  # no champion yet: the first version that passes becomes it
        return True, f"{r.gate_metric}={value:.4g} passes {r.gate_threshold:g}; first champion", value
    current = float(champion.tags.get("pcm.gate_value", "nan"))
    if r.gate_metric == champion.tags.get("pcm.gate_metric") and not better(value, current):
        return False, f"{r.gate_metric}={value:.4g} is worse than champion v{champion.version} ({current:.4g})", value
    return True, f"{r.gate_metric}={value:.4g} passes {r.gate_threshold:g} and beats v{champion.version}", value


def register(cfg: Config) -> dict:
    """Registers cfg.register.lora under cfg.register.model_name; returns the version, aliases and gate decision."""
    r = cfg.register
    lora = Path(r.lora)
    meta = read_lora_config(lora)
    sha = digest([], [lora / DIFFUSERS_FILE])
    metrics_path = Path(r.eval_metrics)
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    client = _client(cfg)
    existing = [v for v in client.search_model_versions(f"name='{r.model_name}'")
                if v.tags.get("pcm.lora_sha256") == sha]
    if existing:  # search results carry no aliases: read the version itself
        version = client.get_model_version(r.model_name, existing[0].version)
        return {"model_name": r.model_name, "version": int(version.version), "created": False,
                "aliases": sorted(version.aliases), "gate": version.tags.get("pcm.gate", ""), "run_id": version.run_id,
                "model_uri": f"models:/{r.model_name}/{version.version}", "tracking_uri": tracking_uri(cfg.tracking)}
    with tracking_store(tracking_uri(cfg.tracking)):
        version = _log_version(cfg, meta, metrics, sha)
    client.set_registered_model_alias(r.model_name, "candidate", version)
    promote, reason, value = _gate(client, cfg, metrics)
    for key, tag in {"pcm.gate": ("promoted: " if promote else "not promoted: ") + reason,
                     "pcm.gate_metric": r.gate_metric, "pcm.gate_value": "nan" if value is None else repr(value)
                     }.items():
        client.set_model_version_tag(r.model_name, version, key, tag)
    if promote:
        client.set_registered_model_alias(r.model_name, "champion", version)
    registered = client.get_model_version(r.model_name, version)
    return {"model_name": r.model_name, "version": int(version), "created": True, "aliases": sorted(registered.aliases),
            "gate": reason, "promoted": promote, "run_id": registered.run_id,
            "model_uri": f"models:/{r.model_name}/{version}", "tracking_uri": tracking_uri(cfg.tracking)}


def _log_version(cfg: Config, meta: dict, metrics: dict, sha: str) -> str:
    """Logs the pyfunc (registered) and the mlflow.diffusers flavor into the distill run (or a new one)."""
    import pcm

    r, lora, base = cfg.register, Path(cfg.register.lora), _base_model(meta["base_model"])
    run_file = lora.parent / RUN_FILE
    known = json.loads(run_file.read_text()) if run_file.is_file() else {}
    run_id = known.get("run_id") if known.get("tracking_uri") == tracking_uri(cfg.tracking) else None
    if run_id is None:
        mlflow.set_experiment(experiment_id=experiment(mlflow.MlflowClient(), cfg.tracking,
                                                       tracking_uri(cfg.tracking)))
    example = pd.DataFrame({"prompt": ["a red circle in the center on a gray background"], "negative_prompt": [""],
                            "steps": [meta["recommended_steps"]], "guidance_scale": [1.0], "seed": [0]})
    optional = [ColSpec(kind, name, required=False) for name, kind in (
        ("negative_prompt", "string"), ("steps", "long"), ("guidance_scale", "double"), ("seed", "long"))]
    signature = ModelSignature(Schema([ColSpec("string", "prompt"), *optional]), Schema([ColSpec("binary", "image")]))
    model_config = {"base_model": base, "family": meta["family"], "resolution": meta["resolution"],
                    "dtype": cfg.teacher.dtype, "device": r.device}
    if meta.get("motion_adapter"):
        model_config["motion_adapter"] = _base_model(meta["motion_adapter"])
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"):
        if meta["family"] != "animatediff":  # the flavor rebuilds DiffusionPipeline(base): no motion adapter there
            mlflow.diffusers.log_model(str(lora / DIFFUSERS_FILE), base_model=base, name="diffusers-lora")
        info = mlflow.pyfunc.log_model(
            name="pcm-lora", python_model=str(Path(__file__).with_name("registered_model.py")),
            artifacts={"lora": str(lora)},
            model_config=model_config, signature=signature, input_example=example,
            code_paths=[str(Path(pcm.__file__).parent)], registered_model_name=r.model_name,
            pip_requirements=_requirements())
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in version_tags(cfg, meta, metrics, sha).items():
        client.set_model_version_tag(r.model_name, version, key, str(value))
    client.update_model_version(r.model_name, version, description=model_card(r.model_name, meta, base))
    return version


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow", "pandas",
             "scipy", "pyyaml", "tqdm")
    return [f"{n}=={version(n)}" for n in names]


def load_registered(cfg: Config, uri: str):
    """The registered pyfunc (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...), generating on register.device."""
    _client(cfg)
    with tracking_store(tracking_uri(cfg.tracking)):
        return mlflow.pyfunc.load_model(uri, model_config={"device": cfg.register.device})
