"""`pcm prepare`: input shards -> filtered, resized, cropped, prepared shards of a fixed sample count.

Input shards are processed in parallel (a forked process per shard, as many at a time as the container's CPU quota
allows, pcm.data.workers) into temporary part files; the main process merges the parts in input order into
shard-00000.tar, ... (dropping keys already seen in earlier shards), so the output is byte-identical for the same
inputs and config whatever the number of workers.

What goes wrong, and what happens then:
  a bad sample (corrupt, too large, filtered)  skipped and counted per reason in stats.json; the stage goes on
  a shard that cannot be read (fully or in part), or whose worker dies (out of memory, a decoder crash)
                                               named under shards_failed with why; the other shards finish
  writing the output fails (a full disk)       the stage fails with OutputError (a PrepareError): before publishing,
                                               the previous prepared shards stay as they were; while publishing,
                                               the folder is left without index.json until a rerun succeeds
  nothing could be read at all                 the stage fails with PrepareError (stats.json says why)
index.json is written last and atomically; a folder without it is incomplete (the loader asks for `pcm prepare`).

What a sample becomes, or why it is skipped, is pcm.data.samples. A prepared folder holds one modality
(data.modality): images (KEY.jpg|png) or video clips (KEY.frames.npy, see pcm.data.video); samples of the other
modality are skipped as wrong_modality.
"""

import errno
import json
import logging
import os
import shutil
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pcm.atomic import fsync_path, write_text
from pcm.config import DataConfig
from pcm.data.images import SkipSample
from pcm.data.samples import limits, process_sample
from pcm.data.shards import RawSample, ShardWriter, encode_sample, iter_folder, iter_tar
from pcm.data.urls import expand_inputs, local_path, open_url
from pcm.data.workers import available_cpus, run_ordered

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """Nothing at all could be read, or the output could not be written."""


class OutputError(PrepareError):
    """Writing the prepared shards failed (a full disk, a read-only folder): the stage's fault, not the data's."""


@contextmanager
def _writing(path: Path | str, publishing: bool = False) -> Iterator[None]:
    """Turns an OSError of the block (writes to the output) into OutputError, naming the cause and the state left."""
    try:
        yield
    except OSError as err:
        hint = ("the disk is full: free space or point data.output_dir at a larger disk"
                if err.errno in (errno.ENOSPC, errno.EDQUOT) else "check that data.output_dir is writable")
        state = ("data.output_dir was being replaced and has no index.json until `pcm prepare` succeeds" if publishing
                 else "nothing was published, the previous prepared shards (if any) are unchanged")
        raise OutputError(f"writing the prepared shards failed at {path}: {err.strerror or err} ({hint}); {state}") \
            from err


@dataclass
class ShardResult:
    index: int
    url: str
    part: str = ""  # temporary file: the kept samples' tar members, back to back
    keys: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes of each kept sample in the part file
    read: int = 0
    without_json: int = 0  # whole samples read without a KEY.json (data.require_json does not apply to them)
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    error: str | None = None  # why the shard could not be read (fully or in part)
    fatal: str | None = None  # the part file could not be written: the stage must fail


def _samples(url: str, cfg: DataConfig) -> Iterator[RawSample]:
    path = local_path(url)
    if path is not None and path.is_dir():
        yield from iter_folder(path, limits(cfg))
        return
    with open_url(url) as stream:  # compressed shards inflate block by block inside tarfile's stream mode
        yield from iter_tar(stream, limits(cfg))


class _Part:
    """A worker's part file. A failed write or flush (a full disk) raises OutputError, which is no OSError, so the
    handler for unreadable input shards never files it as bad data."""

    def __init__(self, path: str):
        self.path = path
        self.file = self._do(open, path, "wb")

    def _do(self, fn, *args):
        with _writing(self.path):
            return fn(*args)

    def write(self, blob: bytes) -> None:
        self._do(self.file.write, blob)

    def close(self) -> None:
        self._do(self.file.close)


def _take(raw: RawSample, job: tuple, result: ShardResult, part: _Part, seen: set[str]) -> None:
    """One input sample: written to the part file, or counted under its skip reason."""
    _, url, cfg, seed, _ = job
    result.read += 1
    result.without_json += int(not raw.truncated and "json" not in raw.files and "json" not in raw.oversized)
    try:
        if raw.key in seen:
            raise SkipSample("duplicate_key")
        files, converted = process_sample(raw, url, cfg, seed)
    except SkipSample as skip:
        result.skipped[skip.reason] += 1
        if skip.reason == "truncated_shard":
            result.error = f"truncated or corrupt tar ({raw.error}): samples before the damage were kept"
        return
    seen.add(raw.key)
    blob = encode_sample(raw.key, files)
    part.write(blob)
    result.keys.append(raw.key)
    result.sizes.append(len(blob))
    if converted:
        result.converted[converted] += 1


def process_shard(job: tuple[int, str, DataConfig, int, str]) -> ShardResult:
    """Worker: one input shard -> a temporary part file of encoded samples (tar members), with counts."""
    index, url, cfg, _, tmp_dir = job
    result = ShardResult(index, url, part=str(Path(tmp_dir) / f"part-{index:05d}.bin"))
    seen: set[str] = set()
    try:
        part = _Part(result.part)
        try:
            for raw in _samples(url, cfg):
                _take(raw, job, result, part, seen)
        except (OSError, tarfile.TarError, EOFError) as err:  # reading the input; writes raise OutputError
            result.error = f"{type(err).__name__}: {err}"
        finally:
            part.close()
    except OutputError as err:
        result.fatal = str(err)
    return result


def _dead_shard(job: tuple, why: str) -> ShardResult:
    """The result of a shard whose worker raised or died: named, with none of its samples (the part is partial)."""
    index, url, _, _, tmp_dir = job
    return ShardResult(index, url, part=str(Path(tmp_dir) / f"part-{index:05d}.bin"),
                       error=f"{why}; none of this shard's samples were kept")


def _merge_part(result: ShardResult, writer: ShardWriter, seen: set[str]) -> int:
    """Copies a part's samples (byte blobs) into the output, dropping keys seen in earlier shards; returns the
    number dropped."""
    duplicates = 0
    if result.keys:
        with open(result.part, "rb") as part:
            for key, size in zip(result.keys, result.sizes, strict=True):
                blob = part.read(size)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                writer.write_encoded(blob)
    Path(result.part).unlink(missing_ok=True)  # absent when a worker died before creating it
    return duplicates


@dataclass
class Totals:
    """The counts of all shards merged so far."""

    read: int = 0
    without_json: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    failed: list[dict] = field(default_factory=list)

    def add(self, result: ShardResult) -> None:
        self.read += result.read
        self.without_json += result.without_json
        self.skipped.update(result.skipped)
        self.converted.update(result.converted)
        if result.error:
            log.warning("shard %s: %s", result.url, result.error)
            self.failed.append({"url": result.url, "error": result.error, "samples_read": result.read})


def _process_all(urls: list[str], cfg: DataConfig, seed: int, staging: Path, progress: bool,
                 workers: int) -> tuple[Totals, ShardWriter]:
    """Every input shard through a worker, merged in input order into staging/shard-*.tar."""
    jobs = [(i, url, cfg, seed, str(staging)) for i, url in enumerate(urls)]
    writer, seen, totals = ShardWriter(staging, cfg.shard_size), set(), Totals()
    bar = tqdm(total=len(jobs), desc="prepare", unit="shard", disable=not progress)
    for result in run_ordered(process_shard, jobs, workers, _dead_shard):
        if result.fatal:
            raise OutputError(result.fatal)
        totals.add(result)
        with _writing(staging):
            totals.skipped["duplicate_key"] += _merge_part(result, writer, seen)
        bar.update()
        bar.set_postfix(written=sum(writer.counts), skipped=sum(totals.skipped.values()))
    bar.close()
    with _writing(staging):
        writer.close()
    return totals, writer


def _publish(staging: Path, out: Path, writer: ShardWriter, index: dict, stats: dict) -> None:
    """Moves the new shards into place and removes shards of an earlier, larger run. The old index.json goes first
    and the new one comes last, so no index.json ever names shards of another run, whatever is interrupted."""
    with _writing(out, publishing=True):
        (out / "index.json").unlink(missing_ok=True)
        fsync_path(out)
        for old in out.glob("shard-*.tar"):
            if old.name not in writer.names:
                old.unlink()
        for name in writer.names:
            os.replace(staging / name, out / name)
        shutil.rmtree(staging)
        write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
        write_text(out / "index.json", json.dumps(index, indent=2) + "\n")


def _stats(urls: list[str], totals: Totals, writer: ShardWriter, workers: int, seconds: float) -> dict:
    return {
        "shards_in": len(urls), "shards_failed": totals.failed, "samples_read": totals.read,
        "samples_written": sum(writer.counts), "samples_without_json": totals.without_json,
        "skipped": dict(sorted((k, v) for k, v in totals.skipped.items() if v)),
        "converted": dict(sorted(totals.converted.items())), "shards_written": len(writer.counts),
        "workers": workers, "seconds": round(seconds, 3),
        "images_per_second": round(totals.read / seconds, 1) if seconds else None,
    }


def _unreadable(stats: dict, urls: list[str]) -> str | None:
    """Why nothing at all could be read (the stage then fails), or None. A run that read samples but kept none
    still publishes its (empty) shards and stats.json, with a warning naming the reasons."""
    if stats["samples_read"] == 0:
        reasons = "; ".join(f"{f['url']}: {f['error']}" for f in stats["shards_failed"][:5])
        return f"no sample could be read from any of the {len(urls)} input shard(s) ({reasons}); check data.inputs"
    if stats["samples_written"] == 0:
        top = ", ".join(f"{reason}: {count}" for reason, count in Counter(stats["skipped"]).most_common(3))
        log.warning("none of the %d samples read passed the filters (%s): see stats.json and the data.* filters",
                    stats["samples_read"], top)
    return None


def prepare(cfg: DataConfig, seed: int, progress: bool = True) -> dict:
    """Runs the stage; returns (and writes) stats.json. Raises PrepareError when nothing could be read, and
    OutputError (a PrepareError) when the output could not be written."""
    start = time.perf_counter()
    urls = expand_inputs(cfg.inputs, cfg.allow_pipe_urls)
    if not urls:
        raise PrepareError("data.inputs is empty: list shard URLs, brace patterns or folders to prepare")
    out = Path(cfg.output_dir).resolve()
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"  # a killed run's workers can never write into this run's
    workers = min(cfg.num_workers or available_cpus(), len(urls))
    try:
        with _writing(out):
            out.mkdir(parents=True, exist_ok=True)
            for leftover in out.glob(".staging*"):  # of runs that were killed
                shutil.rmtree(leftover, ignore_errors=True)
            staging.mkdir()
        totals, writer = _process_all(urls, cfg, seed, staging, progress, workers)
        stats = _stats(urls, totals, writer, workers, time.perf_counter() - start)
        failure = _unreadable(stats, urls)
        if failure is None:
            index = {"resolution": cfg.resolution, "image_format": cfg.image_format,
                     **({"frames": cfg.frames} if cfg.modality == "video" else {}),
                     "shards": [{"name": n, "samples": c, "sha256": d}
                                for n, c, d in zip(writer.names, writer.counts, writer.digests, strict=True)]}
            _publish(staging, out, writer, index, stats)
            return stats
        with _writing(out):
            write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # a failed run gives its disk space back
    raise PrepareError(failure)
