"""Delivery of one MLflow run's records on a daemon thread, so that no training step ever waits on the store.

The caller only puts a record into a bounded queue: microseconds, never blocking, whatever the store does. The
thread sends the records in order (consecutive metric records in one batch). A failing store is retried with
exponential backoff for tracking.retry_seconds; then the run goes on untracked and everything not sent is saved to
<stage output>/mlflow_unlogged.json. A record that finds the queue full (a store slower than the loop) is saved
there too, and counted: nothing is dropped silently. close() waits at most tracking.close_timeout for the thread,
then saves what is left itself. Saving cannot raise either: a corrupt unlogged file is moved aside, a failed write
(a full disk) is logged and tried again at the next save.
"""

import json
import logging
import os
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path

from pcm import atomic

log = logging.getLogger("pcm.tracking")  # one logger for the tracker and its delivery
MAX_BACKOFF = 30.0  # seconds between retries of a failing store, at most
FIRST_BACKOFF = 0.5  # seconds before the first retry; doubles per failure
MAX_BATCH = 1000  # metric values per log_batch call (MLflow's limit per request)
SAVE_EVERY = 5.0  # seconds between writes of records bound for the unlogged file (each write rewrites it)
IDLE_WAIT = 0.2  # seconds the idle thread waits for a record before looking at the spill again


class UnloggedFile:
    """<stage output>/mlflow_unlogged.json: a JSON list of entries {tracking_uri, run_id, stage, reason, error,
    pending: [record, ...]}, one per save, so `json.load` gives back every record that MLflow did not get."""

    def __init__(self, path: Path, header: Callable[[], dict]):
        self.path, self.header = Path(path), header
        self.counts: Counter = Counter()  # records saved, by kind (metrics, params, tags, artifact, end)
        self.unwritten: list[dict] = []  # entries whose write failed: written with the next save
        self._lock = threading.Lock()  # the thread and close() may both save

    def save(self, records: list, reason: str, error: BaseException | None = None) -> bool:
        """Appends an entry for records; False (and an error in the log, never an exception) when the write
        fails, in which case the entry is kept in memory for the next save."""
        with self._lock:
            entries = self.unwritten + ([{**self.header(), "reason": reason, "error": repr(error) if error else None,
                                          "pending": [list(r) for r in records]}] if records else [])
            if not entries:
                return True
            try:
                text = json.dumps(self._previous() + entries, indent=1, default=str) + "\n"
                atomic.write_text(self.path, text)
            except (OSError, ValueError, TypeError) as err:  # a full disk, a read-only folder, an odd value
                self.unwritten = entries
                waiting = sum(len(e["pending"]) for e in entries)
                log.error("could not write %s (%s); %d record(s) MLflow did not get are kept in memory and written "
                          "with the next save", self.path, err, waiting)
                return False
            self.unwritten = []
            self.counts.update(r[0] for e in entries for r in e["pending"])
            return True

    def _previous(self) -> list:
        """The entries already in the file; a file that is not such a list is moved aside (kept, never parsed
        again) so that the records of this run still get saved."""
        if not self.path.is_file():
            return []
        try:
            previous = json.loads(self.path.read_text())
            if isinstance(previous, list):
                return previous
        except (UnicodeDecodeError, ValueError):
            pass
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(self.path, aside)
        log.warning("%s is not a JSON list of entries (corrupt, or written by something else); moved to %s, "
                    "starting a new one", self.path, aside)
        return []

    def lost(self) -> int:
        """Records that could not be written (the last save failed too)."""
        return sum(len(e["pending"]) for e in self.unwritten)


class Outbox:
    """The records of one run, in order, between the caller and the store. put() never blocks; a daemon thread
    calls send(records) (raises on any store failure) and saves to the UnloggedFile what it cannot deliver."""

    def __init__(self, send: Callable[[list], None], file: UnloggedFile, retry_seconds: float, queue_size: int,
                 describe: str):
        self._send, self.file, self.retry_seconds, self.describe = send, file, retry_seconds, describe
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._spill: deque = deque()  # records that found the queue full: saved to the file, not sent
        self.spilled = 0
        self.pending: list = []  # taken from the queue, not yet delivered (saved); changed under _lock only
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set by close(): retry now, deliver the end record, finish
        self._end: tuple | None = None
        self._abandoned = False  # close() gave up waiting and saved what was left: the thread touches nothing more
        self._thread: threading.Thread | None = None
        self.given_up, self.error, self.failures, self.failing_since = False, None, 0, None
        self._last_save = time.monotonic()

    # -- the caller's side ------------------------------------------------------------------------------------------
    def put(self, record: tuple) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._spill.append(record)
            self.spilled += 1
            if self.spilled == 1:
                log.warning("MLflow at %s is slower than the stage logs: %d records are waiting; records that do not "
                            "fit are saved to %s instead (counted, not sent)", self.describe, self._queue.maxsize,
                            self.file.path)

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"mlflow-{self.describe}", daemon=True)
            self._thread.start()

    def close(self, end: tuple, timeout: float) -> None:
        """Delivers everything and then end, waiting at most timeout seconds; what is left then is saved."""
        if self._closing.is_set():
            return
        self._end = end  # before the event: the thread reads it once it sees the event
        self.start()
        self._closing.set()
        self._thread.join(timeout)
        with self._lock:  # normally nothing is left; else the thread is stuck in a request (or died of a bug)
            self._abandoned = True
            left = self.pending + self._drain() + ([self._end] if self._end else [])
            self.pending, self._end = [], None
        if left or self._spill:
            log.error("MLflow at %s still had not taken the %s run's records after tracking.close_timeout=%g s; "
                      "the %d left are saved in %s (the one in flight may arrive too)", self.describe,
                      self.file.header().get("stage"), timeout, len(left) + len(self._spill), self.file.path)
            self.file.save(left, f"not sent within tracking.close_timeout={timeout:g} s", self.error)
            self._save_spill(force=True)
        if self.file.unwritten:
            self.file.save([], "")  # a last try for entries a full disk refused earlier
        if self.file.unwritten:
            log.error("%d record(s) that MLflow did not get could not be saved to %s either: they are lost",
                      self.file.lost(), self.file.path)

    # -- the thread -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._abandoned and self._take():
                if self.given_up:
                    self._save_pending()
                else:
                    self._deliver()
                self._save_spill()
            if not self._abandoned:
                self._save_spill(force=True)
        except Exception as err:  # a bug here must neither reach the stage nor lose records: save them all
            log.exception("MLflow delivery to %s failed unexpectedly; saving its records", self.describe)
            self.given_up, self.error = True, err
            with self._lock:
                left, self.pending = self.pending + self._drain() + ([self._end] if self._end else []), []
                self._end = None
            if not self._abandoned:
                self.file.save(left + self._pop_spill(), "internal error", err)

    def _take(self) -> bool:
        """Moves queued records to pending (waiting a little when there are none); False once all is done."""
        if self.given_up and not self._closing.is_set():
            self._closing.wait(SAVE_EVERY)  # untracked: fewer, larger writes of the file
        with self._lock:  # held while waiting, so close() never sees a record that is in neither place
            if not self.pending and not self.given_up and not self._closing.is_set():
                try:
                    self.pending.append(self._queue.get(timeout=IDLE_WAIT))
                except queue.Empty:
                    pass
            if len(self.pending) <= 1 or self.given_up:  # pending holds one queue's worth at most: memory stays bounded
                self.pending += self._drain()
            if not self.pending and self._closing.is_set():
                if self._end is None:
                    return False
                self.pending.append(self._end)
                self._end = None
        return True

    def _drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _deliver(self) -> None:
        batch = self._batch()
        if not batch:
            return
        try:
            self._send(batch)
        except Exception as err:  # any store failure (network, HTTP, database) is retried, never raised
            if not self._abandoned:
                self._failed(err)
            return
        with self._lock:
            del self.pending[:len(batch)]
        self.failures, self.failing_since = 0, None

    def _batch(self) -> list:
        """The first pending record, or the leading run of metric records (one request for many steps)."""
        with self._lock:
            if not self.pending or self.pending[0][0] != "metrics":
                return self.pending[:1]
            batch, values = [], 0
            for record in self.pending:
                if record[0] != "metrics" or (batch and values + len(record[2]) > MAX_BATCH):
                    break
                batch.append(record)
                values += len(record[2])
            return batch

    def _failed(self, err: Exception) -> None:
        now = time.monotonic()
        if self.failing_since is None:
            self.failing_since = now
            log.warning("MLflow at %s failed (%s: %s); retrying for up to %.0f s (tracking.retry_seconds) while the "
                        "stage goes on", self.describe, type(err).__name__, err, self.retry_seconds)
        self.failures, self.error = self.failures + 1, err
        left = self.retry_seconds - (now - self.failing_since)
        if left <= 0 or self._closing.is_set():  # closing: one more try was made, do not hold the stage's end
            self._give_up()
            return
        self._closing.wait(min(FIRST_BACKOFF * 2.0 ** (self.failures - 1), MAX_BACKOFF, left))

    def _give_up(self) -> None:
        self.given_up = True
        log.error("MLflow at %s kept failing (%s); the %s stage goes on untracked and everything not sent is saved "
                  "in %s", self.describe, self.error, self.file.header().get("stage"), self.file.path)
        self._save_pending(force=True)

    def _save_pending(self, force: bool = False) -> None:
        if not force and not self._closing.is_set() and time.monotonic() - self._last_save < SAVE_EVERY:
            return
        with self._lock:
            records, self.pending = self.pending, []
        self._last_save = time.monotonic()
        self.file.save(records + self._pop_spill(), "MLflow kept failing (tracking.retry_seconds)", self.error)

    def _pop_spill(self) -> list:
        out = []
        while self._spill:
            out.append(self._spill.popleft())
        return out

    def _save_spill(self, force: bool = False) -> None:
        if not self._spill or (not force and time.monotonic() - self._last_save < SAVE_EVERY):
            return
        self._last_save = time.monotonic()
        self.file.save(self._pop_spill(), f"the queue was full ({self._queue.maxsize} records waiting: "
                                          "tracking.queue_size)", self.error)
