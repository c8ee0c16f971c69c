"""Multi-process distillation behind one parent process that a preemption can reach.

Kubernetes (and a user's Ctrl-C) signals one process: ours. `accelerate launch` runs in its own process group; a
SIGTERM or SIGINT to this parent is passed to that whole group (the launcher and every rank), each rank finishes its
step and saves a checkpoint, and the parent waits for them and reports the preemption (the CLI exits 143). torch's
elastic agent inside the launcher SIGKILLs ranks that are still running `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds
after a signal; it is set to the grace period so a large checkpoint has time to land.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

FORWARDED = (signal.SIGTERM, signal.SIGINT)


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved. Rerun with --resume latest."""


def accelerate_command(num_processes: int, mixed_precision: str, params: Path, resume: str | None) -> list[str]:
    """`accelerate launch --multi_gpu` of `pcm distill` on one machine (CPU: gloo, GPU: NCCL)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
            str(num_processes), "--num_machines", "1", "--mixed_precision", mixed_precision, "--dynamo_backend",
            "no", "-m", "pcm.cli", "distill", "--params", str(params), *(["--resume", resume] if resume else [])]


def run_forwarding_signals(command: list[str], grace_seconds: int) -> tuple[int, int | None]:
    """Runs command in a new process group, passing SIGTERM/SIGINT on to the whole group and waiting for it to end
    (the orchestrator's own grace period bounds that wait). Returns (exit code, the first signal received or None)."""
    env = {**os.environ, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(grace_seconds)}
    child = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:  # the group is already gone
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        code = child.wait()  # a forwarded signal does not end the wait (PEP 475): the checkpoint lands first
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, (received[0] if received else None)
