"""The machine-speed line of `make test` / `make demo`: the expectation scaled by a one-second benchmark, and the
measured time at the end."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import machine_speed  # noqa: E402


@pytest.fixture
def reference(tmp_path, monkeypatch):
    path = tmp_path / "machine_speed.json"
    monkeypatch.setattr(machine_speed, "REFERENCE", path)
    monkeypatch.setattr(machine_speed, "speed", lambda seconds=1.0: 50.0)  # half the reference's speed
    path.write_text(json.dumps({"speed": 100.0, "machine": "ref", "durations_s": {"demo": 600.0}}))
    return path


def test_the_expected_duration_scales_with_this_machine_s_speed(reference, capsys):
    assert machine_speed.expect("demo") == 1200.0
    out = capsys.readouterr().out
    assert "0.50x the reference machine (ref)" in out and "took 10.0 min there: expect about 20.0 min here" in out
    assert machine_speed.expect("unknown") is None  # no figure: the speed line alone


def test_run_leaves_the_output_to_the_command_times_it_and_keeps_the_exit_status(reference, capfd):
    script = "import time\nprint('stage output', flush=True)\ntime.sleep(0.2)\nraise SystemExit(3)\n"
    assert machine_speed.run("demo", [sys.executable, "-c", script]) == 3
    out = capfd.readouterr().out
    assert out.index("stage output") < out.index("`make demo` took 0.0 min here")
    assert out.rstrip().endswith("(expected about 20.0 min)")


def test_a_broken_reference_never_fails_the_build(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(machine_speed, "REFERENCE", tmp_path / "absent.json")
    assert machine_speed.main(["expect", "test"]) == 0
    assert "machine speed: not measured (FileNotFoundError" in capsys.readouterr().err


def test_the_repository_s_reference_names_the_two_commands():
    ref = json.loads((Path(machine_speed.__file__).with_name("machine_speed.json")).read_text())
    assert ref["speed"] > 0 and {"test", "demo"} <= set(ref["durations_s"])


def test_run_without_a_reference_still_runs_the_command(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(machine_speed, "REFERENCE", tmp_path / "absent.json")
    assert machine_speed.run("demo", [sys.executable, "-c", "print('ran')"]) == 0
    assert "ran" in capfd.readouterr().out
