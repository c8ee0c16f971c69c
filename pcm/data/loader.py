"""Training batches from prepared shards: shuffled, endless, split over ranks and workers, resumable.

Plan of an epoch e (the same on every rank and worker, from (seed, e) alone):
  1. the shards are permuted; with split="shards" rank r reads shards r, r + W, r + 2W, ... of that order
     (disjoint per rank) and every rank keeps the smallest rank total, so DDP steps stay in lockstep; with
     split="samples" every rank reads all shards and takes its slice of each global batch (the same samples
     whatever the number of ranks, at W times the reading)
  3. a seeded shuffle buffer mixes the record stream; records are cut into batches
  4. the g-th batch since the start position (counted across epochs) goes to DataLoader worker g mod num_workers:
     the main process receives the batches exactly as a single process would (torch's in-order round robin),
     whatever the worker count and however many batches an epoch holds
A position (epoch, batch) names the next batch; a resumed loader replays the record stream up to it (reading,
not decoding) and continues with the next samples. Corrupt samples are skipped and counted in the next batch's
`skipped`; an epoch in which none of a worker's records decode raises EmptyEpochError (endless epochs of nothing
would spin forever, and the other DDP ranks would wait on this one).
"""

import io
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pcm.data.shards import RawSample, iter_tar
from pcm.data.video import FRAMES_KEY, decode_frames_npy

IMAGE_KEYS = ("jpg", "png")
LATENT_KEY = "latent.npy"  # written by pcm.data.precompute in place of the image
# pcm.data.precompute's text states beside the latent (batch name: record file): the text encoders' hidden states
# (L, D) and sdxl's pooled embedding (P,), fp16
TEXT_KEYS = {"text_hidden": "text_hidden.npy", "text_pooled": "text_pooled.npy"}


class EmptyEpochError(RuntimeError):
    """An epoch yielded no decodable record: the prepared shards are corrupt or not prepared data."""


class Position(NamedTuple):
    """Where a loader stands: the next batch's epoch and index within it (a tuple, so it survives collation)."""

    epoch: int = 0
    batch: int = 0


START = Position()


class PreparedShards(IterableDataset):
    """Batches (dicts) from a `pcm prepare` output folder; see the module docstring for the plan."""

    def __init__(self, folder: str | Path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 shuffle_buffer: int = 1000, start: Position = START, split: str = "shards"):
        self.folder = Path(folder)
        index_path = self.folder / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: run `pcm prepare` for this data.output_dir first")
        self.shards = json.loads(index_path.read_text())["shards"]
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} prepared shard(s) cannot feed {world_size} ranks: lower "
                             "data.shard_size and re-run `pcm prepare` so there is at least one per rank")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.shuffle_buffer, self.start = shuffle_buffer, start
        if split not in ("shards", "samples"):
            raise ValueError(f"unknown split {split!r}; allowed: shards, samples")
        self.split = split
        if self.batches_per_epoch(0) == 0:
            raise ValueError(f"each rank gets fewer than batch_size={batch_size} samples per epoch; "
                             "use a smaller batch or more data")

    def _plan(self, epoch: int) -> tuple[list[dict], int]:
        """(this rank's shards in read order, the samples every rank keeps) for an epoch."""
        order = list(self.shards)
        random.Random(f"{self.seed}/shards/{epoch}").shuffle(order)
        if self.split == "samples":
            return order, sum(s["samples"] for s in order) // self.world_size
        per_rank = [order[r::self.world_size] for r in range(self.world_size)]
        keep = min(sum(s["samples"] for s in shards) for shards in per_rank)
        return per_rank[self.rank], keep

    def batches_per_epoch(self, epoch: int) -> int:
        return self._plan(epoch)[1] // self.batch_size

    def next_position(self, position: Position) -> Position:
        """The position after consuming the batch at `position`."""
        if position.batch + 1 < self.batches_per_epoch(position.epoch):
            return Position(position.epoch, position.batch + 1)
        return Position(position.epoch + 1, 0)

    def _records(self, epoch: int) -> Iterator[RawSample]:
        shards, keep = self._plan(epoch)
        if self.split == "samples":
            keep *= self.world_size  # the global stream; _batches takes this rank's slices
        stream_id = "all" if self.split == "samples" else self.rank
        rng = random.Random(f"{self.seed}/buffer/{epoch}/{stream_id}")
        buffer: list[RawSample] = []
        count = 0

        def stream():
            for shard in shards:
                with open(self.folder / shard["name"], "rb") as f:
                    yield from iter_tar(f)

        for record in stream():
            if len(buffer) < self.shuffle_buffer:
                buffer.append(record)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], record = record, buffer[i]
            yield record
            count += 1
            if count == keep:
                return
        rng.shuffle(buffer)
        yield from buffer[: keep - count]

    def _batches(self, epoch: int) -> Iterator[tuple[int, list[RawSample]]]:
        ranks = self.world_size if self.split == "samples" else 1
        size, mine = self.batch_size * ranks, slice(0, self.batch_size)
        if self.split == "samples":
            mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        batch, j = [], 0
        for record in self._records(epoch):
            batch.append(record)
            if len(batch) == size:
                yield j, batch[mine]
                batch, j = [], j + 1

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        epoch, first = self.start.epoch, self.start.batch
        turn, dropped = 0, 0  # batches since the start over all workers; records of wholly corrupt batches
        while True:
            records = decoded = 0
            errors: list[str] = []
            for j, batch_records in self._batches(epoch):
                if j < first:
                    continue
                turn += 1
                if (turn - 1) % num_workers != worker:
                    continue
                records += len(batch_records)
                batch = decode_batch(batch_records, errors)
                if batch is None:
                    dropped += len(batch_records)
                    continue
                decoded += 1
                yield {**batch, "skipped": batch["skipped"] + dropped, "position": Position(epoch, j)}
                dropped = 0
            if records and not decoded:
                raise EmptyEpochError(
                    f"epoch {epoch}: none of the {records} records that rank {self.rank} (loader worker {worker}) read "
                    f"from {self.folder} could be decoded (first: {errors[0] if errors else 'unknown'}); re-run "
                    "`pcm prepare` for this data.output_dir")
            epoch, first = epoch + 1, 0


def decode_batch(records: list[RawSample], errors: list[str] | None = None) -> dict | None:
    """Tensors of a list of prepared records; corrupt ones are skipped and counted (None if all are), and the
    first few of their errors appended to errors."""
    pixels, captions, sizes, crops, keys, texts = [], [], [], [], [], []
    for record in records:
        try:
            if record.truncated:
                raise ValueError("truncated record")
            if LATENT_KEY in record.files:  # a `pcm precompute` record: the teacher's latent, no image
                image = _npy(record.files[LATENT_KEY])
            elif FRAMES_KEY in record.files:  # a video clip: (F, H, W, 3) uint8 -> (F, 3, H, W)
                image = torch.from_numpy(decode_frames_npy(record.files[FRAMES_KEY])).permute(0, 3, 1, 2)
            else:
                ext = next(e for e in IMAGE_KEYS if e in record.files)
                image = Image.open(io.BytesIO(record.files[ext])).convert("RGB")
            meta = json.loads(record.files["json"])
            caption = record.files["txt"].decode("utf-8")
            size = (meta["original_height"], meta["original_width"])
            crop = (meta["crop_top"], meta["crop_left"])
            text = {name: _npy(record.files[file]) for name, file in TEXT_KEYS.items() if file in record.files}
        except (StopIteration, KeyError, OSError, ValueError, SyntaxError) as err:
            if errors is not None and len(errors) < 3:
                errors.append(f"{record.key or '?'}: {type(err).__name__}: {err}")
            continue
        if isinstance(image, torch.Tensor):
            pixels.append(image)
        else:
            pixels.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
        captions.append(caption)
        sizes.append(size)
        crops.append(crop)
        keys.append(record.key)
        texts.append(text)
    if not pixels:
        return None
    if len({tuple(t) for t in texts}) > 1:  # the step builds one condition per batch, from text or captions
        raise ValueError("a shard mixes records with and without precomputed text; re-run `pcm precompute`")
    if len({p.dtype for p in pixels}) > 1:
        raise ValueError("a shard mixes images and precomputed latents; re-run `pcm precompute`")
    if len({p.dim() for p in pixels}) > 1:
        raise ValueError("a shard mixes images and video clips; prepare each data.modality into its own output_dir")
    name = "latent" if pixels[0].dtype == torch.float16 else "pixels"
    return {
        # pixels: (B, 3, H, W) uint8, 4x less to move between processes than float, video clips (B, F, 3, H, W);
        # latent: (B, 4, h, w) fp16
        name: torch.stack(pixels),
        "caption": captions,
        "original_size": torch.tensor(sizes, dtype=torch.int64),  # (B, 2) height, width
        "crop_top_left": torch.tensor(crops, dtype=torch.int64),  # (B, 2) top, left
        "key": keys,
        "skipped": len(records) - len(pixels),
        # text_hidden (B, L, D), text_pooled (B, P): fp16, when `pcm precompute` stored them
        **{name: torch.stack([t[name] for t in texts]) for name in texts[0]},
    }


def _npy(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False))


class Loader:
    """Endless iterable of training batches: a DataLoader over PreparedShards (batching happens in the dataset,
    so batch_size=None there) whose uint8 pixels become float in [-1, 1] in the consuming process."""

    def __init__(self, dataset: PreparedShards, num_workers: int = 0):
        self.dataset = dataset
        self.loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                 persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[dict]:
        for batch in self.loader:
            yield {**batch, "pixels": batch["pixels"].float() / 127.5 - 1.0} if "pixels" in batch else batch

    def next_position(self, position: tuple[int, int]) -> Position:
        return self.dataset.next_position(Position(*position))


def make_loader(folder: str | Path, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                num_workers: int = 0, start: Position = START, shuffle_buffer: int = 1000,
                split: str = "shards") -> Loader:
    """Batches of dicts: pixels (B, 3, H, W) (video: (B, F, 3, H, W)) float in [-1, 1], caption, original_size,
    crop_top_left, key, skipped (corrupt samples dropped from this batch) and position (resume with
    dataset.next_position)."""
    dataset = PreparedShards(folder, batch_size, seed, rank, world_size, shuffle_buffer, start, split)
    return Loader(dataset, num_workers)


def loader_factory(cfg, folder: str | Path | None = None):
    """make_data(micro_batch, rank, world_size, start) for pcm.train.distill, from cfg.data and cfg.train;
    folder: another prepared-shards folder to read (precomputed latents), default cfg.data.output_dir."""
    def make_data(micro_batch: int, rank: int, world_size: int, start: tuple[int, int]) -> Loader:
        t = cfg.train
        return make_loader(folder or cfg.data.output_dir, micro_batch, cfg.seed, rank, world_size, t.num_workers,
                           Position(*start), t.shuffle_buffer, t.data_split)

    return make_data
