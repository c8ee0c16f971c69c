"""Prepare's worker processes: how many the container may run, and one forked process per input shard.

A worker can die under a shard: the kernel's out-of-memory killer (SIGKILL), a decoder that crashes in C (SIGSEGV,
SIGABRT). A process pool breaks as a whole then, losing every shard in flight; a process of its own per shard
loses only that shard, which the caller names, while the other shards finish. Forking costs milliseconds against
the seconds a shard of thousands of samples takes.
"""

import contextlib
import ctypes
import gc
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _cgroup_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path, from /proc/self/cgroup ('' for the v2 unified hierarchy)."""
    paths = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _quota(files: list[tuple[Path, Path | None]]) -> float | None:
    """The tightest CPU quota (cores) among (quota file, period file or None for v2's 'quota period') pairs."""
    cores = []
    for quota_file, period_file in files:
        try:
            if period_file is None:
                quota, period = quota_file.read_text().split()
            else:
                quota, period = quota_file.read_text().strip(), period_file.read_text().strip()
            if quota not in ("max", "-1") and int(period) > 0:
                cores.append(int(quota) / int(period))
        except (OSError, ValueError):
            continue
    return min(cores) if cores else None


def _ancestors(root: Path, path: str) -> list[Path]:
    """root/a/b, root/a, root: a quota on any enclosing cgroup applies too (the container's own is often one up)."""
    parts = [p for p in path.strip("/").split("/") if p and p != ".."]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cpu_quota(root: Path | None = None, proc_cgroup: Path | None = None) -> float | None:
    """Cores the container's CPU quota allows (cgroup v2 cpu.max, v1 cpu.cfs_quota_us / cfs_period_us), or None
    when there is none. A node's 64 cores seen through a 4-core quota would otherwise start 64 workers that the
    scheduler throttles, each holding a shard's samples in memory."""
    root, paths = root or CGROUP_ROOT, _cgroup_paths(proc_cgroup or PROC_CGROUP)
    files: list[tuple[Path, Path | None]] = []
    if "" in paths:
        files += [(d / "cpu.max", None) for d in _ancestors(root, paths[""])]
    for v1 in ("cpu", "cpu,cpuacct"):
        base = root / v1
        for d in _ancestors(base, paths.get("cpu", "/")) if base.is_dir() else []:
            files.append((d / "cpu.cfs_quota_us", d / "cpu.cfs_period_us"))
    return _quota(files)


def available_cpus(root: Path | None = None, proc_cgroup: Path | None = None) -> int:
    """CPUs this process may use: the affinity mask (taskset, cpuset), capped by the CPU quota rounded up."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, proc_cgroup)
    return max(1, min(cpus, math.ceil(quota)) if quota is not None else cpus)


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        why = {"SIGKILL": "the out-of-memory killer sends SIGKILL: lower data.num_workers or data.max_member_bytes",
               "SIGSEGV": "a decoder crashed on this shard's data", "SIGABRT": "a decoder aborted on this shard's data",
               "SIGBUS": "a decoder crashed on this shard's data"}.get(name, "killed from outside")
        return f"the worker process died of {name} ({why})"
    return f"the worker process exited with code {exitcode} without a result"


def _die_with_parent(parent: int) -> None:
    """A worker whose stage was killed (SIGKILL, no cleanup) must not live on and write into the next run's files."""
    with contextlib.suppress(OSError, AttributeError):  # Linux only: elsewhere the worker outlives a killed stage
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # the process's own symbols include libc's
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(fn: Callable, job, send, parent: int) -> None:
    _die_with_parent(parent)
    try:
        message = ("ok", fn(job))
    except BaseException as err:  # noqa: BLE001  (anything: the shard is named with it instead of lost)
        message = ("error", f"{type(err).__name__}: {err}")
    send.send(message)
    send.close()


def _collect(recv, process, job, failed: Callable):
    try:
        kind, value = recv.recv()
    except (EOFError, OSError, pickle.UnpicklingError):  # died before or while sending
        kind, value = "died", None
    recv.close()
    process.join()
    if kind == "ok":
        return value
    return failed(job, value if kind == "error" else _death(process.exitcode))


def _fork(process) -> None:
    """Starts process with the parent's objects frozen out of the child's garbage collector. Garbage the parent has
    not collected yet (an exception's traceback holding a decoded video frame) would otherwise be freed in the
    child, where freeing an ffmpeg scaler joins threads that exist only in the parent: a deadlock."""
    frozen_already = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        process.start()
    finally:
        if not frozen_already:  # the parent collects as before; someone else's freeze is theirs to undo
            gc.unfreeze()


def run_ordered(fn: Callable, jobs: Iterable, workers: int, failed: Callable) -> Iterator:
    """fn(job) for every job, each in a forked process of its own, at most `workers` at a time; the results in job
    order (later ones wait). A job whose process raises or dies yields failed(job, why) instead."""
    jobs = list(jobs)
    context = multiprocessing.get_context("fork")  # the workers inherit the config and code, nothing is pickled in
    running: dict = {}  # receiving end -> (job index, job, process)
    done: dict[int, object] = {}
    started = emitted = 0
    try:
        while emitted < len(jobs):
            while started < len(jobs) and len(running) < workers:
                recv, send = context.Pipe(duplex=False)
                process = context.Process(target=_child, args=(fn, jobs[started], send, os.getpid()),
                                          daemon=True)
                _fork(process)
                send.close()  # the child's end only: a dead child then reads as EOF here
                running[recv] = (started, jobs[started], process)
                started += 1
            for recv in multiprocessing.connection.wait(list(running)):
                index, job, process = running.pop(recv)
                done[index] = _collect(recv, process, job, failed)
            while emitted in done:
                yield done.pop(emitted)
                emitted += 1
    finally:  # the caller stopped early (an error, Ctrl-C): no orphan keeps working
        for recv, (_, _, process) in running.items():
            process.kill()
            process.join()
            recv.close()
