"""`python pipelines/dvc_repro.py --jobs auto [TARGET ...]`: `dvc repro` with the stages that do not depend on each
other run side by side (what `make demo` runs).

dvc repro runs one stage at a time. The demo's four distillations depend only on the teacher, and on a CPU a
distillation uses a second core poorly: two threads make its step ~1.2x faster, where two distillations of one
thread each finish ~1.7x sooner than the same two one after the other (2 cores, measured with `pcm distill`).

The plan is dvc's own: the stages `dvc repro TARGETS` checks, grouped in waves by depth (a stage's wave is one
after its deepest dependency's, so the stages of a wave never depend on each other).
- Consecutive waves of one stage run as one `dvc repro --single-item A B C`, its output passed through; --jobs 1 is
  `dvc repro TARGETS` itself.
- A wave of several stages runs one `dvc --wait-for-lock repro --single-item S` per stage, `jobs` at a time, each on
  cores // (stages running) threads (OMP_NUM_THREADS, unless it is set), its output in a log file under LOGS.
dvc decides whether a stage changed and records it in dvc.lock, exactly as `dvc repro` does: it lets go of its
repository lock while a stage's command runs and takes it back to record the result.

A SIGTERM or SIGINT is passed to every running stage's whole process group (dvc and the `pcm` command under it);
no new stage starts, and the running ones end as they do under dvc (a distillation saves a checkpoint first). When a
stage fails, the others running finish and keep their results, and the failed one's log is shown.
"""

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

STAGE = re.compile(rb"Running stage '([^']+)'")
LOGS = Path(".dvc/tmp/dvc_repro")  # dvc ignores its own tmp folder, and git never sees it (.dvc/.gitignore)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def waves(targets: list[str]) -> list[list[str]]:
    """The stages `dvc repro TARGETS` would check (their dvc addressings), in waves: every stage of a wave depends
    only on stages of earlier waves."""
    from dvc.exceptions import DvcException

    try:
        return _waves(targets)
    except DvcException as err:  # no repository here, a target that names nothing, a broken dvc.yaml: one line
        raise ValueError(f"dvc: {err} (targets: {' '.join(targets) or 'dvc.yaml'}; run it in the project, as dvc "
                         "repro)") from err


def _waves(targets: list[str]) -> list[list[str]]:
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    with Repo() as repo:
        graph = get_active_graph(repo.index.graph)  # edges run from a stage to the stages it depends on
        order = plan_repro(graph, collect_stages(repo, targets or ["dvc.yaml"]))  # dependencies first
        depth: dict = {}
        for stage in order:
            depth[stage] = 1 + max((depth[d] for d in graph.successors(stage) if d in depth), default=-1)
        grouped: dict[int, list[str]] = {}
        for stage in order:
            grouped.setdefault(depth[stage], []).append(stage.addressing)
    return [grouped[d] for d in sorted(grouped)]


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class Runner:
    """The running `dvc` processes, each in its own process group, so a signal reaches the stage under it."""

    def __init__(self, dvc: str):
        self.dvc, self.running, self.signalled = dvc, {}, None  # running: stage(s) -> (process, start, log or None)
        self.seconds: list[tuple[str, float, bool]] = []  # (stage, seconds it took, side by side) of stages that ran

    def forward(self, signum, frame) -> None:
        self.signalled = self.signalled or signum
        for process, _, _ in self.running.values():
            try:
                os.killpg(process.pid, signum)
            except ProcessLookupError:
                pass

    def in_turn(self, args: list[str]) -> int:
        """`dvc repro ARGS`, its output passed through as it comes; times each stage that ran."""
        process = subprocess.Popen([self.dvc, "repro", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.running[tuple(args)] = (process, time.perf_counter(), None)
        current, last, pending = None, time.perf_counter(), b""
        while chunk := os.read(process.stdout.fileno(), 1 << 16):
            sys.stdout.buffer.write(chunk)  # raw: progress bars keep redrawing their line
            sys.stdout.flush()
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for found in filter(None, map(STAGE.search, lines)):
                now = time.perf_counter()
                if current is not None:
                    self.seconds.append((current, now - last, False))
                current, last = found.group(1).decode(), now
        code = process.wait()
        del self.running[tuple(args)]
        if current is not None:
            self.seconds.append((current, time.perf_counter() - last, False))
        return code

    def side_by_side(self, stages: list[str], jobs: int) -> int:
        """One `dvc repro --single-item` per stage, `jobs` at a time, outputs in LOGS; the first failure's code."""
        LOGS.mkdir(parents=True, exist_ok=True)
        queue, failed = list(stages), 0
        threads = max(1, cores() // min(jobs, len(stages)))
        env = {"OMP_NUM_THREADS": str(threads), **os.environ}
        while queue or self.running:
            while queue and len(self.running) < jobs and not failed and not self.signalled:
                stage = queue.pop(0)
                log = LOGS / f"{stage.replace('/', '_').replace(':', '_')}.log"
                with open(log, "wb") as out:
                    process = subprocess.Popen([self.dvc, "--wait-for-lock", "repro", "--single-item", stage],
                                               stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                self.running[stage] = (process, time.perf_counter(), log)
                print(f"stage '{stage}': started side by side ({env['OMP_NUM_THREADS']} thread(s); output in "
                      f"{log})", flush=True)
            if failed or self.signalled:
                queue = []  # nothing more starts; the running ones finish
            time.sleep(0.2)
            for stage, (process, start, log) in list(self.running.items()):
                if process.poll() is None:
                    continue
                del self.running[stage]
                minutes = (time.perf_counter() - start) / 60
                text = log.read_bytes()
                if process.returncode:
                    failed = failed or process.returncode
                    tail = b"\n".join(text.replace(b"\r", b"\n").splitlines()[-30:]).decode(errors="replace")
                    print(f"stage '{stage}' failed (exit {process.returncode}) after {minutes:.1f} min; the end of "
                          f"{log}:\n{tail}", flush=True)
                elif STAGE.search(text):
                    self.seconds.append((stage, minutes * 60, True))
                    print(f"stage '{stage}' done in {minutes:.1f} min", flush=True)
                else:
                    print(f"stage '{stage}' didn't change, skipped", flush=True)
        return failed


def reproduce(targets: list[str], jobs: int) -> int:
    """Runs the stages of `dvc repro TARGETS`, independent ones up to `jobs` at a time; dvc's exit status."""
    dvc = str(Path(sys.executable).with_name("dvc"))
    runner = Runner(dvc if Path(dvc).exists() else "dvc")
    previous = {s: signal.signal(s, runner.forward) for s in SIGNALS}
    start = time.perf_counter()
    try:
        code = runner.in_turn(targets) if jobs == 1 else _run(runner, waves(targets), jobs)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for stage, seconds, beside in runner.seconds:
        print(f"  stage {stage}: {seconds / 60:.1f} min{' (side by side)' if beside else ''}")
    print(f"dvc_repro: {(time.perf_counter() - start) / 60:.1f} min", flush=True)
    if runner.signalled and not code:
        code = 128 + runner.signalled
    return code


def _run(runner: Runner, plan: list[list[str]], jobs: int) -> int:
    """The waves in order: consecutive single-stage waves as one dvc process, a wave of several side by side."""
    in_turn: list[str] = []
    for wave in [*plan, []]:
        if len(wave) == 1:
            in_turn += wave
            continue
        if in_turn:
            code, in_turn = runner.in_turn(["--single-item", *in_turn]), []
            if code or runner.signalled:
                return code
        if wave:
            code = runner.side_by_side(wave, jobs)
            if code or runner.signalled:
                return code
    return 0


def _jobs(text: str) -> int:
    if text == "auto":
        return cores()
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of stages at a time (1 = plain dvc repro) or "
                                         "auto (one per core)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="dvc repro, with up to --jobs stages that do not depend on each "
                                     "other (the DVC pipeline's distillations) run side by side, each on its share of "
                                     "the cores", epilog="example:\n  python pipelines/dvc_repro.py --jobs auto",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("targets", nargs="*", metavar="TARGET", help="what dvc repro takes: stage names or dvc.yaml "
                        "files (default: dvc.yaml)")
    parser.add_argument("--jobs", type=_jobs, default=1, metavar="N|auto", help="stages at a time: auto = one per "
                        "core (default 1: exactly dvc repro); on a GPU machine, only as many as its GPUs hold at once")
    args = parser.parse_args(argv)
    try:
        return reproduce(args.targets, args.jobs)
    except ValueError as err:
        print(f"dvc_repro: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
