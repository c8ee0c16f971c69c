"""MLflow tracking of stages: params, lineage, metrics, artifacts, run files; a store that fails never stops work."""

import json
import logging
import socket

import pytest
from mlflow import MlflowClient

from pcm.config import config_from_dict
from pcm.tracking import RUN_FILE, UNLOGGED_FILE, Tracker, flat_params, track, tracking_uri


def _cfg(tmp_path, **tracking):
    return config_from_dict({"data": {"output_dir": str(tmp_path / "prepared")}, "tracking": tracking})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_tracked_block_logs_params_lineage_metrics_artifacts_and_names_its_run(tmp_path):
    cfg = _cfg(tmp_path, experiment="tracking-test")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "note.txt").write_text("hello")
    with track(cfg, "unit", tmp_path / "out") as tracker:
        tracker.log(10, {"loss": 0.5})
        tracker.log(20, {"loss": 0.25})
        tracker.log_result({"seconds": 3.0, "nested": {"count": 7}, "name": "skipped", "flag": True})
        tracker.artifact(tmp_path / "out" / "note.txt", "notes")
    info = json.loads((tmp_path / "out" / RUN_FILE).read_text())
    assert info["tracking_uri"] == tracking_uri(cfg.tracking) and info["stage"] == "unit"
    client = MlflowClient(info["tracking_uri"])
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.batch_size"] == str(cfg.train.batch_size)
    assert run.data.params["eval.steps"] == "[1, 2, 4, 8, 16]"
    assert set(flat_params({"a": {"b": 1}})) == {"a.b"}
    tags = run.data.tags
    assert tags["pcm.stage"] == "unit" and len(tags["pcm.git_commit"]) in (40, 7) or tags["pcm.git_commit"] == "unknown"
    assert tags["pcm.git_dirty"] in ("true", "false", "unknown") and tags["pcm.params_hash"]
    assert tags["pcm.data_hash"] == "none"  # no prepared data in this folder
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(10, 0.5), (20, 0.25)]
    assert run.data.metrics["nested.count"] == 7 and "flag" not in run.data.metrics
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/note.txt"]


def test_a_failing_block_marks_the_run_failed_and_the_error_goes_on(tmp_path):
    cfg = _cfg(tmp_path, experiment="tracking-test")
    with pytest.raises(ZeroDivisionError):
        with track(cfg, "unit", tmp_path / "out"):
            raise ZeroDivisionError
    info = json.loads((tmp_path / "out" / RUN_FILE).read_text())
    assert MlflowClient(info["tracking_uri"]).get_run(info["run_id"]).info.status == "FAILED"


def test_an_unreachable_server_never_raises_and_what_was_not_logged_is_kept(tmp_path, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    cfg = _cfg(tmp_path, uri=uri, retry_seconds=0.0, request_timeout=2.0)
    with caplog.at_level(logging.WARNING, logger="pcm.tracking"):
        with track(cfg, "unit", tmp_path / "out") as tracker:
            for step in range(1, 4):
                tracker.log(step, {"loss": 1.0 / step})  # the work goes on
    assert tracker.given_up and not (tmp_path / "out" / RUN_FILE).exists()
    saved = json.loads((tmp_path / "out" / UNLOGGED_FILE).read_text())
    assert all(entry["tracking_uri"] == uri for entry in saved)
    kinds = [op[0] for entry in saved for op in entry["pending"]]  # given up at once, and what came after
    assert kinds.count("metrics") == 3 and "params" in kinds and kinds[-1] == "end"
    assert any(uri in r.getMessage() and "goes on untracked" in r.getMessage() for r in caplog.records)


class FlakyClient:
    """An MlflowClient that fails its first `failures` calls, like a server that comes back."""

    def __init__(self, real, failures):
        self.real, self.failures = real, failures

    def __getattr__(self, name):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            if self.failures > 0:
                self.failures -= 1
                raise ConnectionError("server restarting")
            return method(*args, **kwargs)

        return call


def test_buffered_records_are_delivered_in_order_once_the_store_answers(tmp_path):
    cfg = _cfg(tmp_path, experiment="tracking-test", retry_seconds=600.0)
    client = FlakyClient(MlflowClient(tracking_uri(cfg.tracking)), failures=2)
    tracker = Tracker(cfg, "unit", tmp_path / "out", client=client)
    tracker.log(1, {"loss": 1.0})  # fails: buffered, backoff starts
    assert tracker.run_id is None and tracker.pending and tracker.next_try > 0
    tracker.log(2, {"loss": 0.5})  # inside the backoff window: no call at all, still buffered
    assert client.failures == 1
    tracker.flush(force=True)  # fails once more
    run_id = tracker.close()  # delivered
    history = MlflowClient(tracking_uri(cfg.tracking)).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert not tracker.given_up and not (tmp_path / "out" / UNLOGGED_FILE).exists()


def test_tracking_can_be_turned_off(tmp_path):
    with track(_cfg(tmp_path, enabled=False), "unit", tmp_path / "out") as tracker:
        assert tracker is None
    assert not (tmp_path / "out").exists()


def test_distill_logs_its_losses_by_step_and_a_resumed_run_continues_its_mlflow_run(tmp_path):
    import sys
    from pathlib import Path

    from accelerate.state import AcceleratorState

    from pcm import stages

    sys.path.insert(0, str(Path(__file__).parent))
    from worlds import METHODS, tiny_world

    base = tiny_world(tmp_path, methods=())
    train = {**base["train"], "max_steps": 2, "log_every": 1, "output_dir": str(tmp_path / "run")}
    params = {**base, "distill": METHODS["pcm"], "train": train, "tracking": {"experiment": "tracking-test"}}
    AcceleratorState._reset_state(reset_partial_state=True)
    stages.distill(config_from_dict(params), progress=False)
    first = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    AcceleratorState._reset_state(reset_partial_state=True)
    stages.distill(config_from_dict({**params, "train": {**train, "max_steps": 4}}), resume="latest", progress=False)
    info = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert info["run_id"] == first["run_id"]  # the resumed training continues its run
    client = MlflowClient(info["tracking_uri"])
    logged = [(m.step, m.value) for m in client.get_metric_history(info["run_id"], "loss")]
    jsonl = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [(r["step"], r["loss"]) for r in jsonl] and [s for s, _ in logged] == [1, 2, 3, 4]
    artifacts = {a.path for a in client.list_artifacts(info["run_id"])}
    assert {"lora", "metrics.jsonl"} <= artifacts
    run = client.get_run(info["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pcm.data_hash"].startswith("index:")
