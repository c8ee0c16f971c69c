"""pipelines/dvc_repro.py: dvc repro with the stages that do not depend on each other run side by side, on a toy DVC
project of four stages: a -> (b, c) -> d. The demo pipeline itself runs through it in tests/test_dvc.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import dvc_repro as repro  # noqa: E402

# A stage: records when it ran and on how many threads, sleeps $SLEEP_<NAME> seconds (default 1.5), then writes
# NAME.out from its inputs. $FAIL=NAME makes it exit 3; a SIGTERM ends it with a marker file.
STAGE = """
import os, signal, sys, time
name, inputs = sys.argv[1], sys.argv[2:]
def terminated(signum, frame):
    open(f"log/{name}.terminated", "w").close()
    raise SystemExit(143)
signal.signal(signal.SIGTERM, terminated)
os.makedirs("log", exist_ok=True)
start = time.time()
open(f"log/{name}.started", "w").write(os.environ.get("OMP_NUM_THREADS", "unset"))
if os.environ.get("FAIL") == name:
    sys.exit(f"{name}: failing as asked")
deadline = start + float(os.environ.get(f"SLEEP_{name.upper()}", "1.5"))
while time.time() < deadline:
    time.sleep(0.05)
open(f"log/{name}.times", "w").write(f"{start} {time.time()}")
open(f"{name}.out", "w").write("".join(open(i).read() for i in inputs) + name)
"""


def _stage(name: str, *inputs: str) -> dict:
    stage = {"cmd": " ".join([sys.executable, "stage.py", name, *inputs]), "outs": [f"{name}.out"]}
    return stage | ({"deps": list(inputs)} if inputs else {})


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "stage.py").write_text(STAGE)
    stages = {"a": _stage("a"), "b": _stage("b", "a.out"), "c": _stage("c", "a.out"),
              "d": _stage("d", "b.out", "c.out")}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run([_dvc(), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("SLEEP_A", "0")
    monkeypatch.setenv("SLEEP_D", "0")
    return tmp_path


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def _stale() -> set[str]:
    found = subprocess.run([_dvc(), "status", "--json"], capture_output=True, text=True, check=True).stdout
    return set(json.loads(found))


def _times(name: str) -> tuple[float, float]:
    start, end = map(float, Path(f"log/{name}.times").read_text().split())
    return start, end


@pytest.mark.slow
def test_independent_stages_run_side_by_side_on_their_share_of_the_cores_and_dvc_records_them(project, capfd):
    assert [sorted(w) for w in repro.waves([])] == [["a"], ["b", "c"], ["d"]]

    assert repro.reproduce([], jobs=2) == 0
    (b_start, b_end), (c_start, c_end) = _times("b"), _times("c")
    assert max(b_start, c_start) < min(b_end, c_end)  # b and c ran at the same time
    assert _times("a")[1] <= min(b_start, c_start) and max(b_end, c_end) <= _times("d")[0]
    assert Path("log/b.started").read_text() == Path("log/c.started").read_text() == str(max(1, repro.cores() // 2))
    assert Path("log/a.started").read_text() == "unset"  # a stage alone keeps every core
    assert Path("d.out").read_text() == "abacd"
    out = capfd.readouterr().out
    assert "  stage b: " in out and "  stage c: " in out and out.count("(side by side)") == 2
    assert "  stage a: " in out and "  stage d: " in out and "started side by side" in out
    assert repro.reproduce([], jobs=1) == 0  # --jobs 1 is dvc repro itself: dvc.lock records all four, none reruns
    again = capfd.readouterr().out
    assert "Data and pipelines are up to date." in again and "  stage " not in again


@pytest.mark.slow
def test_a_failing_stage_stops_what_follows_while_the_one_beside_it_finishes_and_is_recorded(project, capfd,
                                                                                           monkeypatch):
    monkeypatch.setenv("FAIL", "c")
    assert repro.reproduce([], jobs=2) != 0
    out = capfd.readouterr().out
    assert "stage 'c' failed" in out and "c: failing as asked" in out  # the end of its log, shown
    assert Path("b.out").is_file() and not Path("d.out").exists()
    assert _stale() == {"c", "d"}  # b is recorded: a rerun starts at c

    monkeypatch.delenv("FAIL")
    monkeypatch.setenv("SLEEP_C", "0")
    assert repro.reproduce([], jobs=2) == 0 and Path("d.out").read_text() == "abacd"
    assert "stage 'b' didn't change, skipped" in capfd.readouterr().out


@pytest.mark.slow
def test_a_sigterm_to_the_runner_reaches_every_stage_running_and_starts_nothing_more(project):
    env = {**os.environ, "SLEEP_B": "60", "SLEEP_C": "60"}
    process = subprocess.Popen([sys.executable, repro.__file__, "--jobs", "2"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not (Path("log/b.started").exists() and Path("log/c.started").exists()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0]
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=60)[0]
    assert process.returncode != 0, out
    assert Path("log/b.terminated").exists() and Path("log/c.terminated").exists()  # each stage got the signal
    assert not Path("log/d.started").exists()
    assert _stale() == {"b", "c", "d"}  # a is kept; a rerun runs the rest
