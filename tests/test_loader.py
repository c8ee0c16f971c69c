"""The training loader: rank and worker splitting, endless epochs, resume, corrupt samples."""

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcm.data.loader import Position, PreparedShards, make_loader
from pcm.data.shards import ShardWriter

SHARD_SAMPLES = [10] * 7 + [5]  # 75 samples, the last shard short


def _png(value: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    shards = []
    n = 0
    for count in SHARD_SAMPLES:
        writer = ShardWriter(folder, shard_size=count, prefix=f"s{len(shards)}")
        for _ in range(count):
            meta = {"original_height": 100 + n, "original_width": 80, "crop_top": 1, "crop_left": 2}
            image = b"corrupt" if n == 13 else _png(n % 256)
            writer.write(f"k{n:03d}", {"png": image, "txt": f"caption {n}".encode(), "json": json.dumps(meta).encode()})
            n += 1
        writer.close()
        shards.append({"name": writer.names[0], "samples": count})
    (folder / "index.json").write_text(json.dumps({"shards": shards}))
    return folder


def _keys(batches):
    return [k for b in batches for k in b["key"]]


def _take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_batches_are_tensors_in_range_with_metadata(prepared):
    batch = _take(make_loader(prepared, batch_size=4, seed=0, shuffle_buffer=8), 1)[0]
    assert batch["pixels"].shape[1:] == (3, 8, 8) and batch["pixels"].dtype == torch.float32
    assert float(batch["pixels"].min()) >= -1.0 and float(batch["pixels"].max()) <= 1.0
    n = int(batch["key"][0][1:])
    assert batch["caption"][0] == f"caption {n}"
    assert batch["original_size"][0].tolist() == [100 + n, 80] and batch["crop_top_left"][0].tolist() == [1, 2]
    assert torch.allclose(batch["pixels"][0], torch.full((3, 8, 8), (n % 256) / 127.5 - 1))


def test_two_ranks_get_equal_disjoint_samples_each_epoch(prepared):
    per_rank = []
    for rank in (0, 1):
        ds = PreparedShards(prepared, batch_size=5, seed=3, rank=rank, world_size=2, shuffle_buffer=16)
        batches = _take(make_loader(prepared, 5, 3, rank, 2, shuffle_buffer=16), ds.batches_per_epoch(0))
        assert all(b["position"][0] == 0 for b in batches)
        per_rank.append(_keys(batches) + ["skipped"] * sum(b["skipped"] for b in batches))
    assert len(per_rank[0]) == len(per_rank[1])  # equal counts: DDP steps stay in lockstep
    real = [[k for k in keys if k != "skipped"] for keys in per_rank]
    assert len(set(real[0])) == len(real[0]) and len(set(real[1])) == len(real[1])  # nothing twice in an epoch
    assert not set(real[0]) & set(real[1])


def test_worker_count_does_not_change_the_batch_sequence(prepared):
    single = _take(make_loader(prepared, 4, seed=1, shuffle_buffer=12), 25)
    multi = _take(make_loader(prepared, 4, seed=1, num_workers=2, shuffle_buffer=12), 25)
    assert _keys(single) == _keys(multi)
    assert [b["position"] for b in single] == [b["position"] for b in multi]


def test_epochs_repeat_forever_with_a_new_order_and_each_sample_once(prepared):
    ds = PreparedShards(prepared, batch_size=5, seed=0, shuffle_buffer=20)
    per_epoch = ds.batches_per_epoch(0)
    assert per_epoch == 75 // 5
    batches = _take(make_loader(prepared, 5, 0, shuffle_buffer=20), 2 * per_epoch + 1)
    epochs = [[b for b in batches if b["position"][0] == e] for e in (0, 1)]
    keys0, keys1 = _keys(epochs[0]), _keys(epochs[1])
    assert sorted(keys0) == sorted(keys1) and keys0 != keys1
    assert sorted(keys0) == sorted(f"k{n:03d}" for n in range(75) if n != 13)
    assert batches[-1]["position"] == (2, 0)


def test_a_resumed_loader_continues_with_the_next_samples(prepared):
    full = _take(make_loader(prepared, 4, seed=2, shuffle_buffer=10), 30)
    ds = PreparedShards(prepared, 4, 2, shuffle_buffer=10)
    resume_at = ds.next_position(Position(*full[21]["position"]))  # crash after consuming batch 21
    resumed = _take(make_loader(prepared, 4, seed=2, shuffle_buffer=10, start=resume_at, num_workers=2), 8)
    assert _keys(resumed) == _keys(full[22:30])


def test_corrupt_sample_is_skipped_and_counted(prepared):
    batches = _take(make_loader(prepared, 5, seed=0, shuffle_buffer=20), 15)
    assert sum(b["skipped"] for b in batches) == 1
    assert sum(len(b["key"]) for b in batches) == 74


def test_clear_errors(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `pcm prepare`"):
        PreparedShards(tmp_path, 4, 0)
    with pytest.raises(ValueError, match="cannot feed 9 ranks"):
        PreparedShards(prepared, 4, 0, rank=0, world_size=9)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        PreparedShards(prepared, 100, 0)


def test_sample_split_gives_every_world_size_the_same_global_batches(prepared):
    single = _take(make_loader(prepared, 6, seed=4, shuffle_buffer=12, split="samples"), 10)
    ranks = [_take(make_loader(prepared, 3, 4, rank, 2, shuffle_buffer=12, split="samples"), 10) for rank in (0, 1)]
    for j in range(10):
        assert single[j]["key"] == ranks[0][j]["key"] + ranks[1][j]["key"]


def test_worker_count_does_not_change_the_batches_when_an_epoch_holds_an_odd_number(tmp_path):
    """3 batches per epoch and 2 workers: worker turns run on across epochs, so torch's round robin still delivers
    the single-process sequence (with turns restarting each epoch, epoch 1 would begin with its second batch)."""
    writer = ShardWriter(tmp_path, shard_size=6)
    for n in range(6):
        meta = {"original_height": 8, "original_width": 8, "crop_top": 0, "crop_left": 0}
        writer.write(f"k{n}", {"png": _png(n), "txt": b"c", "json": json.dumps(meta).encode()})
    writer.close()
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": writer.names[0], "samples": 6}]}))
    assert PreparedShards(tmp_path, 2, 0).batches_per_epoch(0) == 3
    single = _take(make_loader(tmp_path, 2, seed=5, shuffle_buffer=4), 9)
    multi = _take(make_loader(tmp_path, 2, seed=5, shuffle_buffer=4, num_workers=2), 9)
    expected = [(e, j) for e in range(3) for j in range(3)]
    assert [b["position"] for b in multi] == [b["position"] for b in single] == expected
    assert _keys(multi) == _keys(single)


def test_a_wholly_corrupt_batch_is_counted_in_the_next_batch(tmp_path):
    writer = ShardWriter(tmp_path, shard_size=6)
    for n in range(6):
        meta = {"original_height": 8, "original_width": 8, "crop_top": 0, "crop_left": 0}
        image = b"corrupt" if n < 2 else _png(n)
        writer.write(f"k{n}", {"png": image, "txt": b"c", "json": json.dumps(meta).encode()})
    writer.close()
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": writer.names[0], "samples": 6}]}))
    batches = _take(make_loader(tmp_path, 2, seed=0, shuffle_buffer=1), 2)  # buffer 1 keeps the order: k0 k1 first
    assert batches[0]["position"] == (0, 1) and batches[0]["skipped"] == 2 and batches[1]["skipped"] == 0
