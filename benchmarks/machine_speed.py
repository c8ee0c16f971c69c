"""How fast is this machine, and how long will `make test` / `make demo` take here?

`expect NAME` times a fixed one-second torch workload (a small convolution's forward and backward, on one
thread) and prints this machine's speed beside the reference machine's and the expected duration of NAME, scaled
from what NAME took there (benchmarks/machine_speed.json). `run NAME -- COMMAND...` runs COMMAND and prints at the
end how long it took against that expectation (pipelines/dvc_repro.py itself prints the minutes of each stage).
Never fails the build: any error of its own is one line on stderr, and `run` exits with COMMAND's status.

    python benchmarks/machine_speed.py expect test
    python benchmarks/machine_speed.py run demo -- python pipelines/dvc_repro.py --jobs auto
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

REFERENCE = Path(__file__).with_name("machine_speed.json")


def speed(seconds: float = 1.0) -> float:
    """Iterations per second of a fixed small training workload (conv forward + backward), after a warm-up: the
    best of four quarters of `seconds`."""
    import torch

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 32, 32, 32, generator=generator)
    weight = torch.randn(32, 32, 3, 3, generator=generator, requires_grad=True)

    def once():
        torch.nn.functional.conv2d(x, weight, padding=1).square().mean().backward()

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core's speed: far steadier (±5 % here) than two threads sharing a busy machine
    try:
        for _ in range(3):
            once()
        rates = []
        for _ in range(4):  # the best of four quarters: a busy moment of the machine lowers one, not the figure
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 4:
                once()
                count += 1
            rates.append(count / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(threads)
    return max(rates)


def reference() -> dict:
    return json.loads(REFERENCE.read_text())


def expect(name: str) -> float | None:
    """Prints this machine's speed and NAME's expected duration here; returns the expected seconds."""
    ref, here = reference(), speed()
    ratio = here / ref["speed"]
    seconds = ref["durations_s"].get(name)
    line = f"machine speed: {here:.0f} it/s, {ratio:.2f}x the reference machine ({ref['machine']})"
    if seconds is not None:
        line += f"; `make {name}` took {seconds / 60:.1f} min there: expect about {seconds / ratio / 60:.1f} min here"
    print(line, flush=True)
    return None if seconds is None else seconds / ratio


def run(name: str, command: list[str]) -> int:
    """Runs command, its output straight to this terminal (progress bars redraw in place); then how long it took
    against the expectation. A Ctrl-C reaches the command from the terminal; this waits for it to end."""
    expected = _safe_expect(name)
    start = time.perf_counter()
    process = subprocess.Popen(command)
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        code = process.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    against = f" (expected about {expected / 60:.1f} min)" if expected else ""
    print(f"`make {name}` took {(time.perf_counter() - start) / 60:.1f} min here{against}", flush=True)
    return code


def _safe_expect(name: str) -> float | None:
    try:
        return expect(name)
    except Exception as err:  # a speed line must never fail the build
        print(f"machine speed: not measured ({type(err).__name__}: {err})", file=sys.stderr)
        return None


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "expect":
        _safe_expect(argv[1])
        return 0
    if len(argv) >= 4 and argv[0] == "run" and argv[2] == "--":
        return run(argv[1], argv[3:])
    print(__doc__.strip().splitlines()[-2].strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
