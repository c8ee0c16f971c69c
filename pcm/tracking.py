"""MLflow tracking of the stages, built so that tracking can never stop the work it records.

Every call (params, tags, metrics by step, artifacts, the run's end) is queued and sent in order when the store
answers. When it does not, the queue is kept and retried with exponential backoff (at most every 30 s, and only
when the stage logs again, so training never waits on it); after `tracking.retry_seconds` of failure the run goes
on untracked, and what was not sent is written to <stage output>/mlflow_unlogged.json with an error saying so.
MLflow's own HTTP retries are turned off (they would block a training step for minutes).

The store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else the embedded SQLite database mlflow/mlflow.db with its
artifacts in mlflow/artifacts (no server; browse with `mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db`).
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

from pcm import __version__
from pcm.config import Config, TrackingConfig, config_to_dict
from pcm.data.digest import digest

log = logging.getLogger(__name__)
RUN_FILE = "mlflow_run.json"
UNLOGGED_FILE = "mlflow_unlogged.json"
EMBEDDED_DB = "mlflow/mlflow.db"
MAX_BACKOFF = 30.0  # seconds between retries of a failing store, at most


def tracking_uri(t: TrackingConfig) -> str:
    return t.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{EMBEDDED_DB}"


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


def data_hash(cfg: Config) -> str:
    """'dvc:<md5>' of data.output_dir as dvc.lock records it, else 'index:<digest of its index.json>'."""
    lock, target = Path("dvc.lock"), Path(cfg.data.output_dir).as_posix().rstrip("/")
    if lock.is_file():
        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for stage in stages.values():
            for out in stage.get("outs", []):
                if out.get("path", "").rstrip("/") == target and out.get("md5"):
                    return f"dvc:{out['md5']}"
    index = Path(cfg.data.output_dir) / "index.json"
    return f"index:{digest([index.read_text()])}" if index.is_file() else "none"


def lineage_tags(cfg: Config, stage: str) -> dict[str, str]:
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {"pcm.stage": stage, "pcm.version": __version__, "pcm.git_commit": commit or "unknown",
            "pcm.git_dirty": "unknown" if dirty is None else str(bool(dirty)).lower(),
            "pcm.params_hash": digest(config_to_dict(cfg)), "pcm.data_hash": data_hash(cfg)}


def _chunks(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Tracker:
    """One MLflow run of one stage; a metrics Sink for the training loop (log(step, metrics))."""

    def __init__(self, cfg: Config, stage: str, out_dir: str | Path, resume: bool = False, client=None):
        self.t, self.stage, self.out = cfg.tracking, stage, Path(out_dir)
        self.uri = tracking_uri(self.t)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(self.t.request_timeout))))
        self._client, self.run_id = client, None
        previous = self.out / RUN_FILE
        if resume and previous.is_file():
            known = json.loads(previous.read_text())
            self.run_id = known["run_id"] if known.get("tracking_uri") == self.uri else None
        self.pending: list[tuple] = [("tags", lineage_tags(cfg, stage)), ("params", flat_params(config_to_dict(cfg)))]
        self.failing_since: float | None = None
        self.next_try, self.failures, self.given_up, self.error = 0.0, 0, False, None

    # -- what stages and the loop call ------------------------------------------------------------------------------
    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.pending.append(("metrics", step, {k: float(v) for k, v in metrics.items()}))
        self.flush()

    def log_result(self, result: dict, prefix: str = "") -> None:
        """Every finite number in a stage's (nested) result dict as a metric at step 0."""
        flat = {}
        for key, value in result.items():
            if isinstance(value, dict):
                self.log_result(value, f"{prefix}{key}.")
            elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                flat[f"{prefix}{key}"] = float(value)
        if flat:
            self.pending.append(("metrics", 0, flat))

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            self.pending.append(("artifact", str(path), artifact_path))

    def close(self, status: str = "FINISHED") -> str | None:
        """Sends what is queued (one more try) and ends the run; returns the run id (None if it never started)."""
        self.pending.append(("end", status))
        self.flush(force=True)
        if self.pending:  # still failing, or given up earlier and more came since: saved, not dropped
            self._give_up()
        return self.run_id

    # -- delivery ---------------------------------------------------------------------------------------------------
    def flush(self, force: bool = False) -> None:
        if self.given_up or (not force and time.monotonic() < self.next_try):
            return
        try:
            client = self._connect()
            while self.pending:
                self._send(client, self.pending[0])
                self.pending.pop(0)
            self.failing_since, self.failures = None, 0
        except Exception as err:  # any store failure (network, HTTP, database) is buffered, never raised
            now = time.monotonic()
            if self.failing_since is None:
                self.failing_since = now
                log.warning("MLflow at %s failed (%s: %s); buffering and retrying for up to %.0f s", self.uri,
                            type(err).__name__, err, self.t.retry_seconds)
            self.failures, self.error = self.failures + 1, err
            self.next_try = now + min(2.0 ** self.failures, MAX_BACKOFF)
            if now - self.failing_since >= self.t.retry_seconds:
                self._give_up()

    def _connect(self):
        from mlflow import MlflowClient

        if self._client is None:
            if self.uri == f"sqlite:///{EMBEDDED_DB}":
                Path(EMBEDDED_DB).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(self.uri)
        if self.run_id is None:
            experiment_id = experiment(self._client, self.t, self.uri)
            run = self._client.create_run(experiment_id, run_name=self.stage)
            self.run_id = run.info.run_id
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / RUN_FILE).write_text(json.dumps({"run_id": self.run_id, "experiment_id": experiment_id,
                                                         "tracking_uri": self.uri, "stage": self.stage}) + "\n")
        return self._client

    def _send(self, client, op: tuple) -> None:
        from mlflow.entities import Metric, Param, RunTag

        kind, run = op[0], self.run_id
        if kind == "tags":
            for part in _chunks([RunTag(k, v) for k, v in op[1].items()], 100):
                client.log_batch(run, tags=part)
        elif kind == "params":
            params = [Param(k, v[:6000]) for k, v in op[1].items()]
            existing = client.get_run(run).data.params  # a resumed run already has them: params are write-once
            for part in _chunks([p for p in params if p.key not in existing], 100):
                client.log_batch(run, params=part)
        elif kind == "metrics":
            stamp = int(time.time() * 1000)
            client.log_batch(run, metrics=[Metric(k, v, stamp, op[1]) for k, v in op[2].items()])
        elif kind == "artifact":
            path = Path(op[1])
            (client.log_artifacts if path.is_dir() else client.log_artifact)(run, str(path), op[2])
        elif kind == "end":
            client.set_terminated(run, op[1])

    def _give_up(self) -> None:
        self.given_up = True
        lost = self.pending
        counts = {kind: sum(1 for op in lost if op[0] == kind) for kind in ("tags", "params", "metrics", "artifact")}
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / UNLOGGED_FILE
        previous = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps(previous + [{"tracking_uri": self.uri, "run_id": self.run_id, "stage": self.stage,
                                                "error": repr(self.error), "pending": [list(op) for op in lost]}],
                                   indent=1) + "\n")
        log.error("MLflow at %s kept failing (%s); the %s stage goes on untracked. Not logged: %d metric records, "
                  "%d artifact(s)%s; all saved in %s", self.uri, self.error, self.stage, counts["metrics"],
                  counts["artifact"], ", params and tags" if counts["params"] or counts["tags"] else "", path)
        self.pending = []


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
