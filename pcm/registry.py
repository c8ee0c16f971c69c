"""The MLflow model registry: `pcm register` (a distilled LoRA as a model version, with aliases and a promotion gate)
and loading it back (`pcm sample --model models:/NAME@champion`).

A version is a pyfunc model that carries the LoRA folder and pcm's own code (code_paths), references the base model
(a local directory, made absolute, or a hub id) and samples with pcm's scheduler over the LoRA's trained edges: a
DataFrame of prompts (columns prompt, negative_prompt, steps, guidance_scale, gamma, seed) in, PNG bytes out; a
missing column takes the version's defaults (sample.* at registration, else the LoRA's recommended, gamma 0).
The same run also holds the LoRA in the `mlflow.diffusers` flavor (LoRA + base model reference, for
`mlflow.diffusers.load_model(uri).load_pipeline()`); that flavor's generic pyfunc samples with the base pipeline's
own scheduler, which does not visit PCM's edges, so the registered version is ours.

Before anything is registered the LoRA is loaded onto its base model's UNet: a truncated file, or one made for
another base, is refused (pcm.inference.LoRAError). A version records the sha256 of its LoRA file (tag
pcm.lora_sha256 and the pyfunc's model_config); loading it recomputes it and refuses a file that differs.

Aliases, never stages: `candidate` on every new version; `champion` moves only when the gate passes (the gate
metric within the threshold and not worse than the current champion's). The gate reads the metrics of
`register.eval_metrics` only when the evaluation beside it (info.json, lora_sha256) says they were measured on this
very file; metrics of another file are refused. Registering the same LoRA again (same sha256) returns the existing
version instead of a duplicate.
"""

import dataclasses
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from pcm.config import Config, RegisterConfig, SampleConfig, TeacherConfig
from pcm.eval.generate import generate_pngs
from pcm.inference import check_family, load_checked, lora_sha256, one_line
from pcm.lineage import evaluation_files, with_evaluation
from pcm.models.card import CONFIG_FILE, LoraFileError, ModelCard, read_card, text_settings
from pcm.models.families import FLOW_FAMILIES, ModelLoadError
from pcm.models.lora import DIFFUSERS_FILE
from pcm.registry_store import RegistryError, connect, resolve, tracking_store
from pcm.serving import model_failures, request_rows
from pcm.tracking import RUN_FILE, experiment, lineage_tags, read_run_file, tracking_uri

ADAPTER = "pcm"
SHA_TAG = "pcm.lora_sha256"
log = logging.getLogger(__name__)


class PCMPipelineModel(PythonModel):
    """The registered pyfunc: base model + LoRA + pcm's sampler. model_config: base_model, family, resolution,
    dtype, t5 and max_sequence_length (sd3, flux: the T5 states the LoRA was distilled with), device (override
    base_model at load time when the base moved), warmup (generate one image while loading, so that a server's first
    request does not pay the lazy first-call costs; set with MLFLOW_PYFUNC_INFERENCE_CONFIG).

    Everything loads in load_context: `mlflow models serve` answers /ping only once it returned. Requests are
    serialized: one generation at a time holds a lock (the UNet, its adapter state and the memory of one forward are
    shared; a second generation alongside would only slow both down). Rows are checked first (pcm.serving)."""

    def load_context(self, context):
        from pcm.models.families import load_teacher

        c, lora = context.model_config, context.artifacts["lora"]
        self.lora_sha256 = check_recorded_sha(lora, c.get("lora_sha256"), "its model_config")
        self.card = lora_config(lora, "registered LoRA")
        self.defaults = SampleConfig(**c.get("sample") or {})  # versions registered before it: the LoRA's own
        teacher = TeacherConfig(family=c["family"], model=c["base_model"], dtype=c.get("dtype", "float32"),
                                motion_adapter=c.get("motion_adapter", ""),
                                **{k: c[k] for k in ("t5", "max_sequence_length") if k in c})
        # model_config may be overridden at load time (a moved base): the LoRA still has to meet its own family
        check_family(self.card, teacher, "the registered LoRA", "load it with model_config={'family': "
                     f"'{self.card.family}', 'base_model': <a {self.card.family} base>}} or leave both as "
                     "registered")
        self.teacher = load_teacher(teacher, c.get("device", "cpu"), resolution=self.card.resolution)
        load_checked(self.teacher.backbone, lora, ADAPTER, "registered LoRA", f"the LoRA records a {self.card.family} "
                     f"base {self.card.base_model}, model_config's base_model is {teacher.family} {teacher.model}")
        self.lock = threading.Lock()
        if c.get("warmup"):
            start = time.perf_counter()
            self.predict(context, pd.DataFrame({"prompt": ["warm-up"]}))
            log.warning("pcm: warm-up generation done in %.2f s", time.perf_counter() - start)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        rows = request_rows(model_input, self.card, self.defaults)  # MlflowException (HTTP 400) when bad
        with self.lock, model_failures():  # past the checks, a failure is the model's: HTTP 500
            return pd.DataFrame({"image": generate_pngs(self.teacher, self.card, ADAPTER, rows, self.defaults)})


def _read_json(path: Path, key: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RegistryError(f"{key}: {path} is unreadable ({one_line(err)}); write it again (the stage that makes "
                            "it) and run `pcm register` again") from err


def lora_config(folder: str | Path, key: str = "register.lora") -> ModelCard:
    """The card of an exported LoRA folder (edges, N, M, base model, recommended sampling); RegistryError naming key
    and the fix when it is missing or unreadable."""
    try:
        return read_card(folder, key)
    except LoraFileError as err:
        raise RegistryError(str(err)) from err


def check_recorded_sha(folder: str | Path, recorded: str | None, where: str) -> str:
    """The LoRA file's sha256 when it is the recorded one; RegistryError when not. A version registered before pcm
    recorded sha256s (no record, or a 16-digit digest) loads with a warning."""
    actual = lora_sha256(folder)
    if not recorded or len(recorded) != 64:
        log.warning("%s records no sha256 of %s (registered by an older pcm): not checked", where, folder)
    elif actual != recorded:
        raise RegistryError(f"{Path(folder) / DIFFUSERS_FILE} has sha256 {actual} but {where} records {recorded}: "
                            "the LoRA was changed or damaged after registration; register it again (`pcm register`)")
    return actual


def check_loads(cfg: Config, lora: Path, card: ModelCard) -> None:
    """Loads the LoRA onto its base model's backbone (the first thing any user of the version does): refuses a base
    that does not load and a LoRA file that does not fit it (truncated, another base)."""
    from pcm.models.families import load_teacher

    base = _base_model(card.base_model)
    motion = _base_model(card.motion_adapter) if card.motion_adapter else ""
    try:
        teacher = load_teacher(TeacherConfig(family=card.family, model=base, dtype=cfg.teacher.dtype,
                                             motion_adapter=motion), "cpu", with_vae=False, with_text=False,
                               resolution=card.resolution)
    except (ModelLoadError, ValueError) as err:
        raise RegistryError(f"register.lora={lora}: its base model {base} (base_model in {CONFIG_FILE}) does not "
                            f"load ({one_line(err)}); make it available there and run `pcm register` again") from err
    load_checked(teacher.backbone, lora, ADAPTER, "register.lora")


def eval_metrics(cfg: Config, sha: str) -> tuple[dict, str | None]:
    """register.eval_metrics, and why the gate may not use them (None: measured on this very LoRA file, as the
    evaluation's info.json beside them records by row label). Metrics of another file are refused."""
    r = cfg.register
    path = Path(r.eval_metrics)
    if not path.is_file():
        return {}, None  # the gate says: run pcm evaluate first
    metrics = _read_json(path, f"register.eval_metrics={path}")
    if not isinstance(metrics, dict) or r.gate_metric not in metrics:  # a typo must not read as "not evaluated yet"
        keys = sorted(metrics) if isinstance(metrics, dict) else []
        shown = ", ".join(keys[:20]) + (f" and {len(keys) - 20} more" if len(keys) > 20 else "")
        reason = (f"register.gate_metric={r.gate_metric} is not a key of {path} (its keys: {shown or 'none'}); set "
                  "register.gate_metric to one of them")
        log.warning("not promoted: %s", reason)
        return {}, reason
    info, label = path.with_name("info.json"), r.gate_metric.split("/")[0]
    files = _read_json(info, f"register.eval_metrics={path}").get("lora_sha256") if info.is_file() else None
    recorded = files.get(label) if isinstance(files, dict) else None
    if recorded is None:
        return metrics, (f"{info} records no sha256 of the LoRA behind {label} (an evaluation by an older pcm, or "
                         "metrics not written by pcm evaluate): evaluate register.lora with `pcm evaluate`")
    if recorded != sha:
        raise RegistryError(f"register.eval_metrics={path}: its {label} row was measured on a LoRA file with sha256 "
                            f"{recorded}, but register.lora={r.lora} has sha256 {sha}; evaluate this LoRA (`pcm "
                            "evaluate` with it in eval.loras) or point register.eval_metrics at its evaluation")
    return metrics, None


def _base_model(model: str) -> str:
    """A local teacher directory as an absolute path (the registry outlives the working directory); hub ids as is."""
    return str(Path(model).resolve()) if Path(model).is_dir() else model


def version_tags(cfg: Config, card: ModelCard, metrics: dict, sha: str) -> dict[str, str]:
    label = card.label
    key_metrics = {f"eval.{k.removeprefix(label + '/')}": v for k, v in metrics.items()
                   if k.startswith(f"{label}/k{card.recommended_steps}/")}
    return {"pcm.family": card.family, "pcm.method": card.method, "pcm.phases": card.num_phases,
            "pcm.edges": json.dumps(card.edges), "pcm.N": card.num_solver_steps, "pcm.guidance": card.guidance,
            "pcm.recommended_steps": card.recommended_steps,
            "pcm.recommended_guidance_scale": card.recommended_guidance_scale,
            "pcm.recommended_scheduler": card.recommended_scheduler,
            "pcm.sampling_timesteps": json.dumps(card.sampling_timesteps), SHA_TAG: sha,
            **key_metrics, **lineage_tags(cfg, "register")}


def registered_defaults(cfg: Config, card: ModelCard) -> SampleConfig:
    """What a version samples with when a column is missing: sample.* where set, else the LoRA's recommended steps and
    CFG, and its recommended gamma."""
    s = cfg.sample
    return SampleConfig(num_steps=card.recommended_steps if s.num_steps is None else s.num_steps,
                        gamma=card.recommended_gamma if s.gamma is None else s.gamma,
                        guidance_scale=card.recommended_guidance_scale if s.guidance_scale is None
                        else s.guidance_scale)


def _diffusers_sampling(card: ModelCard, t5_tokens: int) -> str:
    """What follows load_lora_weights in the model card's diffusers recipe, to the description's end."""
    if card.is_flow and card.method == "pcm":
        kwargs = ", ".join(f"{k}={v!r}" for k, v in card.diffusers_kwargs(t5_tokens).items())
        return ("then sample the trained path with the pipeline's own flow scheduler (or `pcm sample --model ...`):"
                f'\n\n```python\nimage = pipe("a red circle in the center on a gray background", {kwargs}).images[0]'
                "\n```")
    if card.is_flow:
        return f"then: {card.recommended_scheduler}."
    return (f"then a `TCDScheduler` with\n`timesteps={card.sampling_timesteps[:-1]}` and `gamma=0` (deterministic "
            "PCM), or `pcm sample --model ...`.")


def model_card(name: str, card: ModelCard, base: str, defaults: SampleConfig, t5_tokens: int = 256) -> str:
    video = f" (clips of {card.frames} frames: `num_frames={card.frames}`)" if card.is_video else ""
    guidance, embedded, columns = f"CFG {card.recommended_guidance_scale}", card.embedded_guidance_scale, ""
    if embedded is not None:  # FLUX.1-dev: our guidance_scale is true CFG, FluxPipeline's is the embedded one
        guidance = f"true CFG {card.recommended_guidance_scale} over the embedded guidance {embedded}"
        columns = (f" `guidance_scale` is true CFG (FluxPipeline's `true_cfg_scale`, 1 = off); the embedded guidance "
                   f"stays {embedded}, what the LoRA was distilled at.")
    return f"""# {name}

A {card.method.upper()} LoRA distilled from `{base}` ({card.family}) with pcm-pipelines: {card.num_phases}
phase(s) over a {card.num_solver_steps}-step solver grid, guidance variant `{card.guidance}`.

**Sampling as trained:** {card.recommended_steps} steps at {guidance}, visiting
exactly the timesteps {card.sampling_timesteps} ({card.recommended_scheduler}).
**This version's defaults** (a missing input column): {defaults.num_steps} steps, CFG {defaults.guidance_scale},
gamma {defaults.gamma} (TCD's stochastic step; 0 = deterministic PCM; a `gamma` column in [0, 1] sets it).

```python
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}@champion")   # base + LoRA + pcm's sampler
png = model.predict(pd.DataFrame({{"prompt": ["a red circle in the center on a gray background"], "seed": [0]}}))
```

Input columns: `prompt` (required), `negative_prompt`, `steps`, `guidance_scale`, `gamma`, `seed`; anything else
is refused.{columns} Over HTTP: `mlflow models serve -m models:/{name}@champion --env-manager local`, then POST
`{{"dataframe_records": [{{"prompt": "...", "seed": 0}}]}}` to `/invocations`: the images come back base64-encoded.

With diffusers directly: `pipe = {_diffusers_pipeline(card, base)}`{video},
`pipe.load_lora_weights(<the version's artifacts>/artifacts/lora)`, {_diffusers_sampling(card, t5_tokens)}
"""


def _diffusers_pipeline(card: ModelCard, base: str) -> str:
    """The diffusers line that builds the base pipeline the LoRA goes into."""
    if card.motion_adapter:
        adapter = _base_model(card.motion_adapter)
        return (f'AnimateDiffPipeline.from_pretrained("{base}", '
                f'motion_adapter=MotionAdapter.from_pretrained("{adapter}"))')
    if card.family == "animatediff":
        return f'AnimateDiffPipeline.from_pretrained("{base}")'
    return f'DiffusionPipeline.from_pretrained("{base}")'


def gate_decision(r: RegisterConfig, metrics: dict, champion: tuple[str, str, float] | None
                  ) -> tuple[bool, str, float | None]:
    """(promote, reason, the metric's value) for the champion alias; champion: (version, its gate metric, its
    value) or None. With register.gate_bound=ci the interval's cautious end decides: it must pass the threshold
    and beat the champion's value."""
    value = metrics.get(r.gate_metric)
    if value is None:
        return False, f"{r.gate_metric} not in {r.eval_metrics} (run pcm evaluate first)", None
    lower = r.gate_direction == "lower"
    better = (lambda a, b: a <= b) if lower else (lambda a, b: a >= b)
    decided, name = value, r.gate_metric
    if r.gate_bound == "ci":
        name = f"{r.gate_metric}/{'ci_high' if lower else 'ci_low'}"
        decided = metrics.get(name)
        if decided is None:
            return False, (f"{name} not in {r.eval_metrics}: register.gate_bound=ci needs the evaluation's intervals "
                           "(eval.bootstrap_resamples > 0), or set register.gate_bound=value"), value
    if not better(decided, r.gate_threshold):
        return False, f"{name}={decided:.4g} misses the threshold {r.gate_threshold:g}", value
    if champion is None:
        return True, f"{name}={decided:.4g} passes {r.gate_threshold:g}; first champion", value
    version, metric, current = champion
    if metric == r.gate_metric and not better(decided, current):
        return False, f"{name}={decided:.4g} is worse than champion v{version} ({current:.4g})", value
    return True, f"{name}={decided:.4g} passes {r.gate_threshold:g} and beats v{version}", value


def _gate(client, cfg: Config, metrics: dict) -> tuple[bool, str, float | None]:
    """(promote, reason, value) for the champion alias, against the current champion (gate_decision)."""
    try:
        found = client.get_model_version_by_alias(cfg.register.model_name, "champion")
        champion = (found.version, found.tags.get("pcm.gate_metric"), float(found.tags.get("pcm.gate_value", "nan")))
    except Exception:  # no champion yet: the first version that passes becomes it
        champion = None
    return gate_decision(cfg.register, metrics, champion)


def register(cfg: Config) -> dict:
    """Registers cfg.register.lora under cfg.register.model_name; returns the version, aliases and gate decision.
    Checks first, so that a refused LoRA leaves the registry untouched: its folder, that it loads onto its base,
    and that the gate's metrics are its own."""
    r = cfg.register
    lora = Path(r.lora)
    card = lora_config(lora)
    sha = lora_sha256(lora)
    metrics, unverified = eval_metrics(cfg, sha)
    check_loads(cfg, lora, card)
    client = connect(cfg)
    existing = [v for v in client.search_model_versions(f"name='{r.model_name}'") if v.tags.get(SHA_TAG) == sha]
    if existing:  # search results carry no aliases: read the version itself
        version = client.get_model_version(r.model_name, existing[0].version)
        return {"model_name": r.model_name, "version": int(version.version), "created": False,
                "aliases": sorted(version.aliases), "gate": version.tags.get("pcm.gate", ""), "run_id": version.run_id,
                "model_uri": f"models:/{r.model_name}/{version.version}", "tracking_uri": tracking_uri(cfg.tracking),
                "lora_sha256": sha}
    with tracking_store(tracking_uri(cfg.tracking)):
        version = _log_version(cfg, card, metrics if unverified is None else {}, sha)
    client.set_registered_model_alias(r.model_name, "candidate", version)
    promote, reason, value = _gate(client, cfg, metrics) if unverified is None else (False, unverified, None)
    for key, tag in {"pcm.gate": ("promoted: " if promote else "not promoted: ") + reason,
                     "pcm.gate_metric": r.gate_metric, "pcm.gate_value": "nan" if value is None else repr(value)
                     }.items():
        client.set_model_version_tag(r.model_name, version, key, tag)
    if promote:
        client.set_registered_model_alias(r.model_name, "champion", version)
    registered = client.get_model_version(r.model_name, version)
    return {"model_name": r.model_name, "version": int(version), "created": True, "aliases": sorted(registered.aliases),
            "gate": reason, "promoted": promote, "run_id": registered.run_id,
            "model_uri": f"models:/{r.model_name}/{version}", "tracking_uri": tracking_uri(cfg.tracking),
            "lora_sha256": sha}


def _log_version(cfg: Config, card: ModelCard, metrics: dict, sha: str) -> str:
    """Logs the pyfunc (registered) and the mlflow.diffusers flavor into the distill run (or a new one)."""
    import pcm

    r, lora, base = cfg.register, Path(cfg.register.lora), _base_model(card.base_model)
    run_id = read_run_file(lora.parent / RUN_FILE, tracking_uri(cfg.tracking))  # the distill run, when readable
    if run_id is None:
        mlflow.set_experiment(experiment_id=experiment(mlflow.MlflowClient(), cfg.tracking,
                                                       tracking_uri(cfg.tracking)))
    defaults = registered_defaults(cfg, card)
    example = pd.DataFrame({"prompt": ["a red circle in the center on a gray background"], "negative_prompt": [""],
                            "steps": [defaults.num_steps], "guidance_scale": [defaults.guidance_scale],
                            "gamma": [defaults.gamma], "seed": [0]})
    # no input schema: MLflow would drop an unknown column before predict sees it (pcm.serving says why)
    signature = ModelSignature(outputs=Schema([ColSpec("binary", "image")]))
    # the card's T5 settings (what the LoRA read), else the register-time config's (a card written before them)
    text = {"t5": cfg.teacher.t5, "max_sequence_length": cfg.teacher.max_sequence_length} | text_settings(card)
    model_config = {"base_model": base, "family": card.family, "resolution": card.resolution,
                    "dtype": cfg.teacher.dtype, "device": r.device, "lora_sha256": sha,
                    "sample": dataclasses.asdict(defaults), "warmup": False}
    if card.motion_adapter:
        model_config["motion_adapter"] = _base_model(card.motion_adapter)
    if card.family in FLOW_FAMILIES:  # T5's states (or their zeros) are part of the condition the LoRA learned
        model_config |= {"t5": text["t5"], "max_sequence_length": text["max_sequence_length"]}
    report = Path(r.eval_metrics).parent if metrics else None  # an evaluation of this very file (eval_metrics)
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else "register"), \
            tempfile.TemporaryDirectory() as scratch:
        if card.family != "animatediff":  # the flavor rebuilds DiffusionPipeline(base): no motion adapter there
            mlflow.diffusers.log_model(str(lora / DIFFUSERS_FILE), base_model=base, name="diffusers-lora")
        artifacts = {"lora": str(lora)}
        if report is not None:
            artifacts["evaluation"] = str(evaluation_files(report, Path(scratch) / "evaluation"))
        info = mlflow.pyfunc.log_model(
            name="pcm-lora", python_model=str(Path(__file__).with_name("registered_model.py")),
            artifacts=artifacts, model_config=model_config, signature=signature, input_example=example,
            code_paths=[str(Path(pcm.__file__).parent)], registered_model_name=r.model_name,
            pip_requirements=_requirements())
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in version_tags(cfg, card, metrics, sha).items():
        client.set_model_version_tag(r.model_name, version, key, str(value))
    description = model_card(r.model_name, card, base, defaults, text["max_sequence_length"])
    if report is not None:
        description = with_evaluation(description, report, r.gate_metric.split("/")[0])
    client.update_model_version(r.model_name, version, description=description)
    return version


def _requirements() -> list[str]:
    from importlib.metadata import version

    names = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors", "numpy", "pillow", "pandas",
             "scipy", "pyyaml", "tqdm")
    return [f"{n}=={version(n)}" for n in names]


def load_registered(cfg: Config, uri: str):
    """The registered pyfunc (models:/NAME@ALIAS, models:/NAME/VERSION, runs:/...), generating on register.device.
    Its LoRA file must have the sha256 the version recorded: in its model_config (checked while loading) and, for a
    models:/ URI, in the registry's tag. A read: it creates no store and writes nothing into the artifact store
    (the version loads from its storage location; pcm.registry_store says why)."""
    store = tracking_uri(cfg.tracking)
    client = connect(cfg, read=True)
    version, location = resolve(client, uri, store)
    with tracking_store(store):
        model = mlflow.pyfunc.load_model(location, model_config={"device": cfg.register.device})
    recorded = version.tags.get(SHA_TAG) if version is not None else None
    loaded = model.unwrap_python_model().lora_sha256
    if recorded and len(recorded) == 64 and loaded != recorded:
        raise RegistryError(f"{uri}: the registry records sha256 {recorded} for version {version.version}'s LoRA, but "
                            f"its artifact has {loaded}: the artifact store was changed after registration; register "
                            "the LoRA again (`pcm register`)")
    return model
