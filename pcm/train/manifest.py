"""Run identity: an output folder of `pcm distill` belongs to one run, named by its manifest.

<train.output_dir>/manifest.json is written when a run starts. It holds what makes two runs the same run: the
resolved config without the keys a resume may change (the step budget, cadences, paths, tracking), a digest of the
data trained on, and the teacher (its reference and, for a local folder, its files' names and sizes). A resume is
refused when the manifest differs, naming the keys; a fresh run into a folder that already holds a run is refused
unless it is told to resume or to overwrite. So a second pipeline run never continues, exports or registers the
first one's LoRA.
"""

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from pcm.atomic import write_text
from pcm.config import Config, config_to_dict

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
VERSION = 1
# Keys a resumed run may change: how long it runs, how often it logs, validates and checkpoints, where it writes.
RESUMABLE = frozenset({"train.max_steps", "train.log_every", "train.validate_every", "train.checkpoint_every",
                       "train.keep_checkpoints", "train.output_dir", "data.inputs", "data.output_dir",
                       "teacher.model"})  # the last three: identified by content (data digest, teacher files)
# Sections no training step reads: other stages' settings and where tracking goes.
UNRELATED = ("sample", "demo", "demo_teacher", "eval", "tracking", "register", "pipeline", "validation")
# What `pcm distill --overwrite` replaces: everything a run writes into its output folder.
RUN_FILES = ("checkpoints", "lora", "samples", "metrics.jsonl", "mlflow_run.json", "mlflow_unlogged.json",
             MANIFEST, "resolved-params.yaml")


class RunMismatch(ValueError):
    """The output folder holds another run (its manifest differs from this config, data or teacher)."""


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _sha(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def data_digest(folder: str | Path) -> str:
    """16 hex digits over the folder's index.json and the names and sizes of the shards it lists (a stat, not a
    read: a prepared CC3M folder is hundreds of GB); 'missing' when there is no index.json."""
    index = Path(folder) / "index.json"
    if not index.is_file():
        return "missing"
    text = index.read_text()
    try:
        names = [s["name"] for s in json.loads(text).get("shards", [])]
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
        names = []
    sizes = [(n, (Path(folder) / n).stat().st_size if (Path(folder) / n).is_file() else None) for n in names]
    return _sha([text, sizes])


def teacher_reference(cfg: Config) -> dict:
    """The teacher section plus, for local folders (teacher, VAE, motion adapter), each file's name and size."""
    t = cfg.teacher
    files = {}
    for name, reference in (("model", t.model), ("vae", t.vae), ("motion_adapter", t.motion_adapter)):
        root = Path(reference) if reference else None
        if root is not None and root.is_dir():
            files[name] = _sha(sorted((p.relative_to(root).as_posix(), p.stat().st_size)
                                      for p in root.rglob("*") if p.is_file()))
    return {**config_to_dict(cfg)["teacher"], "files": files}


@dataclass(frozen=True)
class RunManifest:
    """What identifies a run (see the module docstring)."""

    config: dict  # dotted key -> value, without RESUMABLE keys and UNRELATED sections
    data_digest: str
    teacher: dict
    version: int = VERSION

    @property
    def config_hash(self) -> str:
        return _sha(self.config)

    @classmethod
    def of(cls, cfg: Config, data_folder: str | Path) -> "RunManifest":
        flat = _flat({k: v for k, v in config_to_dict(cfg).items() if k not in UNRELATED})
        return cls({k: v for k, v in flat.items() if k not in RESUMABLE}, data_digest(data_folder),
                   teacher_reference(cfg))

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "config_hash": self.config_hash}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def read(cls, path: Path) -> "RunManifest":
        try:
            data = json.loads(path.read_text())
            return cls(data["config"], data["data_digest"], data["teacher"], data["version"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
            raise RunMismatch(f"{path}: unreadable run manifest ({type(err).__name__}: {err}); the folder's run "
                              "cannot be identified: start with --overwrite, or choose another train.output_dir") \
                from err

    def differences(self, other: "RunManifest") -> list[str]:
        """'key: this -> other' for every key that differs (config keys, data digest, teacher)."""
        mine = {**self.config, "data digest": self.data_digest, **_flat(self.teacher, "teacher.")}
        theirs = {**other.config, "data digest": other.data_digest, **_flat(other.teacher, "teacher.")}
        return [f"{k}: {json.dumps(mine.get(k))} -> {json.dumps(theirs.get(k))}"
                for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]


def holds_a_run(out: Path) -> bool:
    """Whether a run wrote into out already: checkpoints (complete or not), an exported LoRA, or a manifest."""
    checkpoints = out / "checkpoints"
    return (out / MANIFEST).exists() or (out / "lora").exists() or (checkpoints.is_dir()
                                                                   and any(checkpoints.iterdir()))


def claim(out: str | Path, manifest: RunManifest, resume: str | None, overwrite: bool, main: bool = True) -> None:
    """Makes out this run's folder before anything else is written there.

    resume (latest | a checkpoint path): the manifest beside the checkpoints must equal this one (a folder written
    before manifests existed is adopted, with a warning). Fresh (resume None): a folder holding another run is
    refused, or emptied of that run's files when overwrite. Only the main process writes; the others check."""
    out = Path(out)
    found = Path(resume).resolve().parents[1] / MANIFEST if resume and resume != "latest" else out / MANIFEST
    if resume and found.is_file():
        differences = RunManifest.read(found).differences(manifest)
        if differences:
            raise RunMismatch(f"--resume {resume}: {found} belongs to another run; differing "
                              f"({len(differences)}): " + "; ".join(differences[:8])
                              + ". Resume with the run's own settings, start it anew with --overwrite, or choose "
                              "another train.output_dir")
        return
    if not resume and holds_a_run(out):
        if not overwrite:
            raise RunMismatch(f"train.output_dir={out} already holds a run (checkpoints, lora/ or {MANIFEST}); "
                              "pass --resume latest to continue it, --overwrite to replace it, or choose another "
                              "train.output_dir")
        if main:
            for name in RUN_FILES:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    if resume and holds_a_run(out):
        log.warning("%s has no %s (written before run manifests existed); adopting it as this run's", out, MANIFEST)
    if main:
        write_text(out / MANIFEST, manifest.to_json())
