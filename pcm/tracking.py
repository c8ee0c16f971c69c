"""MLflow tracking of the stages, built so that tracking can never stop or slow the work it records.

Every call (params, tags, metrics by step, artifacts, the run's end) only queues a record; a background thread
sends them in order (pcm/tracking_queue.py), so a training step never waits on the store, even one that hangs.
A failing store is retried with exponential backoff; after `tracking.retry_seconds` of failure the run goes on
untracked, and what was not sent is written to <stage output>/mlflow_unlogged.json with an error saying so. Records
that find the queue full (`tracking.queue_size`) go to that file too, counted. At the stage's end the tracker waits
at most `tracking.close_timeout` for the store, then saves what is left there. MLflow's own HTTP retries are turned
off (they would hold a request for minutes).

The store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite database mlflow/mlflow.db with its
artifacts in mlflow/artifacts (no server; browse with `mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`),
under the project's root (project_root), never under whatever folder a command happens to run in: the folder named
by $PCM_PROJECT_DIR (the CLI sets it from --params), else the nearest folder at or above the working directory
that holds params.yaml or dvc.yaml, else the source checkout pcm runs from, else the working directory. A relative
sqlite:/// URI given in tracking.uri or $MLFLOW_TRACKING_URI is the user's own and stays relative to the
working directory, as MLflow reads it.
Each stage writes <stage output>/mlflow_run.json (run id, experiment, URI), so a pipeline finds its run from its
outputs. Lineage tags: git commit and dirty flag, the DVC hash of the prepared data (from dvc.lock when it records
it, else a digest of the shards' index), the params hash, the pcm version.
"""

import json
import logging
import math
import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from pcm import __version__, atomic
from pcm.config import Config, TrackingConfig, config_to_dict
from pcm.data.digest import digest, prepared_digest
from pcm.tracking_queue import Outbox, UnloggedFile

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
UNLOGGED_FILE = "mlflow_unlogged.json"
EMBEDDED_DB = "mlflow/mlflow.db"
PROJECT_ENV = "PCM_PROJECT_DIR"
PROJECT_MARKERS = ("params.yaml", "dvc.yaml")


def project_root(start: str | Path | None = None) -> Path:
    """The folder the embedded store lives under. From start (a params file or a folder; default: $PCM_PROJECT_DIR
    as is, else the working directory) up to the first folder holding params.yaml or dvc.yaml, as git and dvc find
    their roots; failing that, the source checkout pcm itself runs from (the demo's project), then start."""
    if start is None and os.environ.get(PROJECT_ENV):
        return Path(os.environ[PROJECT_ENV]).resolve()
    begin = Path(start).resolve() if start is not None else Path.cwd()
    begin = begin.parent if begin.is_file() else begin
    for folder in (begin, *begin.parents):
        if any((folder / marker).is_file() for marker in PROJECT_MARKERS):
            return folder
    checkout = Path(__file__).resolve().parent.parent  # an installed wheel sits in site-packages: no markers
    return checkout if any((checkout / m).is_file() for m in PROJECT_MARKERS) else begin


def use_params_file(path: str | Path) -> Path:
    """Makes the project of a params file the one every later default store resolves against, in this process and
    in the ranks it launches (the environment is inherited); returns that root. What `pcm --params FILE` calls."""
    root = project_root(path)
    os.environ[PROJECT_ENV] = str(root)
    return root


def default_store() -> str:
    """sqlite:////<project root>/mlflow/mlflow.db: the embedded store, as an absolute URI."""
    return f"sqlite:///{(project_root() / EMBEDDED_DB).as_posix()}"


def tracking_uri(t: TrackingConfig) -> str:
    return t.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_store()


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (relative ones against the working directory, as SQLAlchemy reads
    them); None for any other store."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def experiment(client, t: TrackingConfig, uri: str) -> str:
    """The id of experiment t.experiment, created when missing. In a SQLite store its artifacts go to
    t.artifact_root, or next to the database file (<db folder>/artifacts) when that is empty; a server decides
    for itself."""
    found = client.get_experiment_by_name(t.experiment)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        root = Path(t.artifact_root) if t.artifact_root else Path(uri.removeprefix("sqlite:///")).parent / "artifacts"
        location = (root.resolve() / t.experiment).as_uri()
    return client.create_experiment(t.experiment, artifact_location=location)


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """{'train.batch_size': '32', ...}: nested config as dotted keys, lists as JSON."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flat_params(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def dvc_md5(path: str) -> str | None:
    """The md5 that dvc.lock (in the working directory, where DVC runs the stages) records for the output path, None
    when it records none. Raises on an unreadable dvc.lock."""
    lock, target = Path("dvc.lock"), Path(path).as_posix().rstrip("/")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path", "").rstrip("/") == target and out.get("md5"):
                    return out["md5"]
    return None


def data_hash(cfg: Config) -> str:
    """'dvc:<md5>' of data.output_dir as dvc.lock records it, else 'index:<digest of its index.json>'; 'unknown'
    when either file is unreadable (a lineage tag is not worth failing a stage)."""
    try:
        md5 = dvc_md5(cfg.data.output_dir)
        if md5:
            return f"dvc:{md5}"
        index = Path(cfg.data.output_dir) / "index.json"
        return f"index:{digest([index.read_text()])}" if index.is_file() else "none"
    except (OSError, ValueError, yaml.YAMLError, AttributeError, TypeError) as err:
        log.warning("no data hash for the lineage tags (%s: %s)", type(err).__name__, err)
        return "unknown"


def shards_dataset(cfg: Config) -> dict | None:
    """The prepared shards (data.output_dir) as an MLflow dataset record (mlflow.entities.Dataset's fields), None
    before `pcm prepare` wrote index.json. digest: pcm.data.digest.prepared_digest (equal data, equal digest);
    profile: sample and shard counts; source: the folder, the input shard URLs and, when dvc.lock records the folder,
    where DVC gets it back (`dvc get REPO PATH --rev REV`: the git remote or checkout, commit, path and md5)."""
    folder = Path(cfg.data.output_dir)
    try:
        index = json.loads((folder / "index.json").read_text())
        md5 = dvc_md5(cfg.data.output_dir)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError) as err:
        log.warning("the prepared shards are not logged as an MLflow dataset (%s: %s)", type(err).__name__, err)
        return None
    source = {"uri": folder.resolve().as_uri(), "inputs": list(cfg.data.inputs)}
    top = _git("rev-parse", "--show-toplevel")
    if md5 and top:
        resolved = folder.resolve()
        path = resolved.relative_to(top).as_posix() if resolved.is_relative_to(top) else resolved.as_posix()
        source["dvc"] = {"repo": _git("config", "--get", "remote.origin.url") or top,
                         "rev": _git("rev-parse", "HEAD") or "unknown", "path": path, "md5": md5}
    shards = index.get("shards", [])
    profile = {"num_samples": sum(s.get("samples", 0) for s in shards), "num_shards": len(shards),
               "resolution": index.get("resolution"), **({"frames": index["frames"]} if "frames" in index else {})}
    member = "frames.npy" if "frames" in index else index.get("image_format", "jpg")
    schema = {"mlflow_colspec": [{"type": "binary", "name": member, "required": True},
                                 {"type": "string", "name": "txt", "required": True},
                                 {"type": "string", "name": "json", "required": True}]}
    return {"name": cfg.data.output_dir, "digest": prepared_digest(folder), "source_type": "dvc" if "dvc" in source
            else "local", "source": json.dumps(source), "schema": json.dumps(schema), "profile": json.dumps(profile)}


def lineage_tags(cfg: Config, stage: str) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"pcm.stage": stage, "pcm.version": __version__, "pcm.git_commit": commit or "unknown",
            "pcm.git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
            "pcm.params_hash": digest(config_to_dict(cfg)), "pcm.data_hash": data_hash(cfg)}


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


_HTTP_SET: dict[str, str] = {}  # what http_settings itself put into the environment


def http_settings(t: TrackingConfig) -> None:
    """MLflow's HTTP client as tracking wants it: no retries of its own (they would hold a request for minutes) and
    t.request_timeout per request. Values a user set in the environment win; values set here follow the config."""
    for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),
                        ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(t.request_timeout))))):
        if os.environ.get(name) in (None, _HTTP_SET.get(name)):
            os.environ[name] = _HTTP_SET[name] = value


def read_run_file(path: Path, uri: str) -> str | None:
    """The run id in a stage's mlflow_run.json when it names a run in the store at uri; None (and a warning when
    the file is unreadable) otherwise, so that a damaged file starts a new run instead of failing the stage."""
    if not path.is_file():
        return None
    try:
        known = json.loads(path.read_text())
        if not isinstance(known, dict) or not isinstance(known.get("run_id"), str) or not known["run_id"]:
            raise ValueError("no run_id string in it")
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        log.warning("%s is unreadable (%s); this stage starts a new MLflow run", path, err)
        return None
    return known["run_id"] if known.get("tracking_uri") == uri else None


def _numbers(metrics: dict) -> dict[str, float]:
    """The values that are numbers, as floats (anything else is not a metric and is left out, not raised)."""
    out = {}
    for key, value in metrics.items():
        try:
            out[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return out


class Tracker:
    """One MLflow run of one stage; a metrics Sink for the training loop (log(step, metrics)).

    Every method returns at once: records go to a pcm.tracking_queue.Outbox, whose thread talks to the store."""

    def __init__(self, cfg: Config, stage: str, out_dir: str | Path, resume: bool = False, client=None):
        self.t, self.stage, self.out = cfg.tracking, stage, Path(out_dir)
        self.uri = tracking_uri(self.t)
        http_settings(self.t)
        self._client = client
        self.run_id = read_run_file(self.out / RUN_FILE, self.uri) if resume else None
        self.unlogged = UnloggedFile(self.out / UNLOGGED_FILE, lambda: {"tracking_uri": self.uri,
                                                                        "run_id": self.run_id, "stage": stage})
        self.outbox = Outbox(self._send_all, self.unlogged, self.t.retry_seconds, self.t.queue_size, self.uri)
        db = sqlite_file(self.uri)
        if db is not None and not db.exists():
            self._create_store()
        self.outbox.put(("tags", lineage_tags(cfg, stage)))
        self.outbox.put(("params", flat_params(config_to_dict(cfg))))

    # -- what stages and the loop call ------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Queues one step's metrics; microseconds, whatever the store does. The first call starts delivery (not
        before: a stage may replace its output folder before it logs, and the run file is written there)."""
        self.outbox.put(("metrics", int(step), _numbers(metrics)))
        self.outbox.start()

    def start(self) -> None:
        """Starts delivery before the first log, for a stage whose output folder is already in place: MLflow's
        import and the run's creation then overlap the stage's start-up (teacher loading) instead of its steps."""
        self.outbox.start()

    def log_result(self, result: dict, prefix: str = "") -> None:
        """Every finite number in a stage's (nested) result dict as a metric at step 0."""
        flat = {}
        for key, value in result.items():
            if isinstance(value, dict):
                self.log_result(value, f"{prefix}{key}.")
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"{prefix}{key}"] = float(value)
        if flat:
            self.outbox.put(("metrics", 0, flat))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.outbox.put(("artifact", str(path), artifact_path))

    def log_input(self, cfg: Config, context: str) -> None:
        """The prepared shards as a dataset this run read (shards_dataset: what mlflow.log_input records), with its
        context (training, evaluation, ...); nothing before `pcm prepare` wrote them."""
        dataset = shards_dataset(cfg)
        if dataset is not None:
            self.outbox.put(("input", dataset, context))

    def close(self, status: str = "FINISHED") -> str | None:
        """Delivers what is queued and ends the run, waiting at most tracking.close_timeout; what is left is saved
        to mlflow_unlogged.json. Returns the run id (None if the run never started). Never raises."""
        try:
            self.outbox.close(("end", status), self.t.close_timeout)
            counts = self.unlogged.counts
            if counts:
                log.error("%s stage: MLflow at %s did not get %d metric record(s), %d artifact(s)%s%s; all saved in "
                          "%s", self.stage, self.uri, counts["metrics"], counts["artifact"],
                          ", params and tags" if counts["params"] or counts["tags"] else "",
                          ", the run's end" if counts["end"] else "", self.unlogged.path)
        except Exception:  # tracking never fails the stage it records
            log.exception("closing the MLflow run of the %s stage failed", self.stage)
        return self.run_id

    @property
    def given_up(self) -> bool:
        return self.outbox.given_up

    @property
    def spilled(self) -> int:
        """Records that found the delivery queue full (saved to mlflow_unlogged.json instead)."""
        return self.outbox.spilled

    def _create_store(self) -> None:
        """Makes a new SQLite store here, not on the delivery thread: its schema migrations take seconds (minutes on
        a loaded machine), and a process that exits after tracking.close_timeout would leave a half-migrated store
        that every later stage fails on. A local file cannot hang like a server; a failure here is the thread's to
        retry and report, as any store failure."""
        try:
            self._client = None
            self._connect_store().search_experiments(max_results=1)  # runs the migrations to the head revision
        except Exception as err:  # tracking never fails the stage: delivery retries, then saves the records
            log.warning("could not create the MLflow store at %s (%s: %s); delivery will retry", self.uri,
                        type(err).__name__, err)
            self._client = None

    # -- delivery (on the outbox's thread) --------------------------------------------------------------------------
    def _connect_store(self):
        from mlflow import MlflowClient

        if self._client is None:
            if self.uri == default_store():  # the embedded store is made on first use; a user's URI is theirs
                sqlite_file(self.uri).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.uri)
        return self._client

    def _connect(self):
        self._connect_store()
        if self.run_id is None:
            experiment_id = experiment(self._client, self.t, self.uri)
            self.run_id = self._client.create_run(experiment_id, run_name=self.stage).info.run_id
            self._write_run_file(experiment_id)
        return self._client

    def _write_run_file(self, experiment_id: str) -> None:
        """mlflow_run.json names the run for pipelines and resumes; failing to write it (a full disk) costs only
        that, so it is logged, not treated as a store failure (which would retry and create runs)."""
        info = {"run_id": self.run_id, "experiment_id": experiment_id, "tracking_uri": self.uri, "stage": self.stage}
        try:
            atomic.write_text(self.out / RUN_FILE, json.dumps(info) + "\n")
        except OSError as err:
            log.error("could not write %s (%s); the %s stage logs to MLflow run %s, but a resumed stage will start "
                      "a new run", self.out / RUN_FILE, err, self.stage, self.run_id)

    def _send_all(self, records: list[tuple]) -> None:
        """Sends records in order (the outbox passes either one record or a run of metric records)."""
        from mlflow.entities import Metric

        client = self._connect()
        if all(r[0] == "metrics" for r in records):
            stamp = int(time.time() * 1000)
            metrics = [Metric(k, v, stamp, step) for _, step, values in records for k, v in values.items()]
            for part in _chunks(metrics, 1000):
                client.log_batch(self.run_id, metrics=part)
            return
        for record in records:
            self._send(client, record)

    def _send(self, client, op: tuple) -> None:
        from mlflow.entities import Param, RunTag

        kind, run = op[0], self.run_id
        if kind == "tags":
            for part in _chunks([RunTag(k, v) for k, v in op[1].items()], 100):
                client.log_batch(run, tags=part)
        elif kind == "params":
            params = [Param(k, v[:6000]) for k, v in op[1].items()]
            existing = client.get_run(run).data.params  # a resumed run already has them: params are write-once
            for part in _chunks([p for p in params if p.key not in existing], 100):
                client.log_batch(run, params=part)
        elif kind == "artifact":
            path = Path(op[1])
            (client.log_artifacts if path.is_dir() else client.log_artifact)(run, str(path), op[2])
        elif kind == "input":
            from mlflow.entities import Dataset, DatasetInput, InputTag
            from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

            client.log_inputs(run, [DatasetInput(Dataset(**op[1]), [InputTag(MLFLOW_DATASET_CONTEXT, op[2])])])
        elif kind == "end":
            client.set_terminated(run, op[1])
        else:
            raise ValueError(f"unknown tracking record {kind!r}; allowed: tags, params, metrics, artifact, input, "
                             "end")


@contextmanager
def track(cfg: Config, stage: str, out_dir: str | Path, resume: bool = False):
    """A Tracker for the block (None when tracking.enabled is false or on a non-zero distributed rank); the run
    ends FINISHED, or FAILED when the block raises (the exception goes on)."""
    if not cfg.tracking.enabled or os.environ.get("RANK", "0") != "0":
        yield None
        return
    tracker = Tracker(cfg, stage, out_dir, resume)
    try:
        yield tracker
    except Exception as err:
        tracker.close("KILLED" if type(err).__name__ == "Preempted" else "FAILED")  # preempted: resumed later
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit
        tracker.close("KILLED")
        raise
    tracker.close()
