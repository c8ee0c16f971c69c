"""Metric sinks: where the training loop sends its numbers (console + JSONL now; MLflow plugs in the same way)."""

import json
import math
from pathlib import Path
from typing import Protocol

from tqdm import tqdm


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...


class JsonlSink:
    """Appends {"step": ..., metrics} lines to a file (kept across resumes) and echoes them to the console."""

    def __init__(self, path: str | Path, echo: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.echo = echo

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.echo:
            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))


class MultiSink:
    """Sends every record to several sinks."""

    def __init__(self, *sinks: Sink):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)
