"""Hostile and broken data, with the faults injected for real: compression bombs under a measured memory bound,
workers killed mid-shard, a full disk (/dev/full) under every write, kills at every step of publishing, phone
photos, formats we do not train on, folders without json, stale latents, and a loader fed nothing decodable.

Every test also checks that nothing is dropped silently: samples_read == samples_written + sum(skipped).
"""

import builtins
import faulthandler
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from builders import RGB_JPG, image_bytes, sample_members, write_tar, written_samples
from PIL import Image

import pcm.atomic
import pcm.data.prepare as prepare_module
import pcm.data.shards as shards_module
import pcm.data.workers as workers_module
from pcm.config import config_from_dict, load_config
from pcm.data.loader import EmptyEpochError, PreparedShards, make_loader
from pcm.data.precompute import find_latents, latents_key, precomputed_dir
from pcm.data.prepare import OutputError, PrepareError, prepare
from pcm.data.shards import Limits, ShardWriter, iter_tar
from pcm.data.workers import available_cpus, cpu_quota

ROOT = Path(__file__).resolve().parents[1]
BOMB_BYTES = 200 * 2**20  # what the 204 KB shard inflates to


def _cfg(urls, out, **data):
    return config_from_dict({"data": {"inputs": [str(u) for u in urls], "output_dir": str(out), "resolution": 32,
                                      "min_side": 32, "shard_size": 4, "image_format": "png", "num_workers": 2,
                                      **data}})


def _run(urls, out, **data) -> dict:
    cfg = _cfg(urls, out, **data)
    return prepare(cfg.data, cfg.seed, progress=False)


def _accounted(stats: dict) -> bool:
    """Every sample read is either written or skipped under a reason: nothing vanishes."""
    return stats["samples_read"] == stats["samples_written"] + sum(stats["skipped"].values())


def _tar_bytes(members: list[tuple[str, bytes]], end: bool = True) -> bytes:
    """Members as tar bytes; end=False leaves out the end-of-archive blocks (to append more by hand)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        end_at = out.tell()
    return out.getvalue() if end else out.getvalue()[:end_at]


def _gz_bomb(path: Path, header: tarfile.TarInfo) -> Path:
    """A .tar.gz: two good samples, then `header` claiming BOMB_BYTES of zeros (which follow, inflating from about
    200 KB), then one more good sample. Streamed through gzip: the test never holds the zeros either."""
    header.size = BOMB_BYTES
    with gzip.open(path, "wb", compresslevel=9) as out:
        out.write(_tar_bytes(sample_members("before0", RGB_JPG) + sample_members("before1", RGB_JPG), end=False))
        out.write(header.tobuf(tarfile.GNU_FORMAT))
        zeros = bytes(2**20)
        for _ in range(BOMB_BYTES // len(zeros)):
            out.write(zeros)
        out.write(_tar_bytes(sample_members("after", RGB_JPG)))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    pax = tarfile.TarInfo("././@PaxHeader")
    pax.type = tarfile.XHDTYPE
    return {"caption": _gz_bomb(root / "caption-bomb.tar.gz", tarfile.TarInfo("bomb.txt")),
            "pax": _gz_bomb(root / "pax-bomb.tar.gz", pax)}


# Linux keeps a process's peak RSS across exec: a python started from pytest (hundreds of MB with torch) would
# report pytest's size. A fresh python forks at once, so the measured child starts small and its peak is its own;
# the parent has no other child, so its RUSAGE_CHILDREN is that child's (and its reaped workers') peak.
MEASURE = """
import json, os, resource, sys
pid = os.fork()
if pid == 0:
    sys.argv = sys.argv[1:]  # the measured script sees its own arguments from argv[1]
    exec(compile(sys.argv[0], "measured", "exec"))
    sys.stdout.flush()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(json.dumps({"peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "status": status}))
"""


def _peak_growth_kib(script: str, *args: str) -> tuple[int, dict]:
    """(peak RSS of script, run in a measured process, minus its RSS when the measured part began (the script prints
    before_kib), the script's JSON output)."""
    done = subprocess.run([sys.executable, "-c", MEASURE, script, *args], cwd=ROOT, capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    *lines, last = done.stdout.decode().strip().splitlines()
    measured = json.loads(last)
    assert measured["status"] == 0, done.stderr.decode()[-2000:]
    result = json.loads(lines[-1])
    return measured["peak_kib"] - result["before_kib"], result


NAIVE_READ = """
import json, resource, sys, tarfile
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tarfile.open(sys.argv[1], "r|*") as archive:
    sizes = [len(archive.extractfile(m).read()) for m in archive if m.isfile()]
print(json.dumps({"before_kib": before, "largest": max(sizes)}))
"""

PREPARE = """
import json, resource, sys
from pcm.config import config_from_dict
from pcm.data.prepare import prepare
cfg = config_from_dict(json.loads(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "stats": prepare(cfg.data, cfg.seed, progress=False)}))
"""


@pytest.mark.slow
def test_compression_bombs_are_skipped_unread_in_bounded_memory(bombs, tmp_path):
    assert bombs["caption"].stat().st_size < 250_000  # 200 MiB of caption in a ~204 KB shard
    naive, read = _peak_growth_kib(NAIVE_READ, str(bombs["caption"]))
    assert read["largest"] == BOMB_BYTES and naive > 190 * 1024  # the measurement sees a 200 MiB read
    params = {"data": {"inputs": [str(bombs["caption"]), str(bombs["pax"])], "output_dir": str(tmp_path / "out"),
                       "resolution": 32, "min_side": 32, "num_workers": 2}}
    growth, result = _peak_growth_kib(PREPARE, json.dumps(params))
    stats = result["stats"]
    print(f"peak memory growth: naive read {naive / 1024:.0f} MiB, prepare of both bombs {growth / 1024:.1f} MiB")
    assert growth < 48 * 1024
    assert stats["skipped"]["too_large"] == 1  # the 200 MiB caption, left unread
    assert set(written_samples(tmp_path / "out")) == {"before0", "before1", "after"}  # the rest of the shard is kept
    failed = {Path(f["url"]).name: f["error"] for f in stats["shards_failed"]}
    assert set(failed) == {"pax-bomb.tar.gz"} and "extended header of 209715200 bytes" in failed["pax-bomb.tar.gz"]
    assert _accounted(stats)


def test_member_limits_come_from_headers_before_reading(tmp_path):
    data = _tar_bytes([("a.jpg", b"j" * 900), ("a.txt", b"t" * 100), ("b.jpg", b"j" * 1001), ("b.txt", b"ok"),
                       ("c.jpg", b"j" * 900), ("c.png", b"p" * 400), ("c.gif", b"g" * 5000), ("d.txt", b"t" * 101)])

    class Counting(io.BytesIO):  # the largest single read shows no member was read whole past its limit
        largest = 0

        def read(self, size=-1):
            chunk = super().read(size)
            Counting.largest = max(Counting.largest, len(chunk))
            return chunk

    limits = Limits(media=1000, text=100, keep=frozenset({"jpg", "png", "txt", "json"}))
    samples = {s.key: s for s in iter_tar(Counting(data), limits)}
    assert samples["a"].files == {"jpg": b"j" * 900, "txt": b"t" * 100} and not samples["a"].oversized
    assert set(samples["b"].files) == {"txt"} and "1001 bytes > limit 1000" in samples["b"].oversized["jpg"]
    assert "400 bytes on top of 900" in samples["c"].oversized["png"]  # one sample holds one medium and its texts
    assert samples["c"].unread == {"gif"} and "gif" not in samples["c"].files
    assert "101 bytes > limit 100" in samples["d"].oversized["txt"]
    assert Counting.largest <= 10240  # tarfile's block reads: the skipped members streamed past
    folder = tmp_path / "folder"  # a folder's files: the size comes from stat
    folder.mkdir()
    (folder / "x.jpg").write_bytes(RGB_JPG)
    (folder / "x.txt").write_text("a caption " * 200)
    (folder / "y.jpg").write_bytes(RGB_JPG)
    (folder / "y.txt").write_text("a caption")
    stats = _run([folder], tmp_path / "out", max_text_bytes=1000)
    assert stats["skipped"] == {"too_large": 1} and stats["samples_written"] == 1 and _accounted(stats)


def test_a_tar_cut_at_a_header_boundary_is_flagged_truncated(tmp_path):
    whole = _tar_bytes(sample_members("k0", RGB_JPG) + sample_members("k1", RGB_JPG), end=False)
    cut = whole[:whole.index(b"k1.txt")]  # right after k1's image: no caption header, no end blocks
    (tmp_path / "cut.tar").write_bytes(cut)
    stats = _run([tmp_path / "cut.tar"], tmp_path / "out")
    assert stats["skipped"] == {"truncated_shard": 1} and stats["samples_written"] == 1  # not missing_caption
    assert "end-of-archive" in stats["shards_failed"][0]["error"] and _accounted(stats)


def _die(death: str) -> None:
    if death == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if death == "abort":  # what a C decoder's failed assertion does
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        faulthandler.disable()  # pytest's handler would print a traceback for the signal
        os.abort()
    raise MemoryError("decoding s1_2")


@pytest.mark.parametrize(("death", "named"), [("sigkill", "SIGKILL (the out-of-memory killer"),
                                               ("abort", "SIGABRT (a decoder aborted"),
                                               ("memory_error", "MemoryError: decoding s1_2")])
def test_a_worker_that_dies_mid_shard_is_named_and_the_other_shards_finish(tmp_path, monkeypatch, death, named):
    urls = []
    for s in range(3):
        members = [m for i in range(4) for m in sample_members(f"s{s}_{i}", RGB_JPG)]
        urls.append(write_tar(tmp_path / f"in-{s}.tar", members))
    real = prepare_module.process_sample

    def dying(raw, url, cfg, seed):  # the workers are forked: they inherit this
        if raw.key == "s1_2":
            _die(death)
        return real(raw, url, cfg, seed)

    monkeypatch.setattr(prepare_module, "process_sample", dying)
    stats = _run(urls, tmp_path / "out")
    assert [Path(f["url"]).name for f in stats["shards_failed"]] == ["in-1.tar"]
    error = stats["shards_failed"][0]["error"]
    assert named in error and "none of this shard's samples" in error
    assert set(written_samples(tmp_path / "out")) == {f"s{s}_{i}" for s in (0, 2) for i in range(4)}
    assert stats["samples_read"] == 8 and _accounted(stats)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["shards"][1]["samples"] == 4


def _cgroup(tmp_path: Path, files: dict[str, str], proc: str) -> tuple[Path, Path]:
    for name, text in files.items():
        (tmp_path / "fs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fs" / name).write_text(text)
    (tmp_path / "cgroup").write_text(proc)
    return tmp_path / "fs", tmp_path / "cgroup"


@pytest.mark.parametrize(("files", "proc", "quota"), [
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),  # cgroup v2, namespaced
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),
    ({"kube/pod/cpu.max": "400000 100000\n", "kube/cpu.max": "200000 100000\n"}, "0::/kube/pod\n", 2.0),  # parent's
    ({"cpu,cpuacct/cpu.cfs_quota_us": "50000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
     "4:memory:/x\n3:cpu,cpuacct:/\n", 0.5),  # cgroup v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu,cpuacct:/\n", None),
])
def test_cpu_quota_of_cgroups_v1_and_v2(tmp_path, files, proc, quota):
    root, proc_file = _cgroup(tmp_path, files, proc)
    assert cpu_quota(root, proc_file) == quota
    affinity = len(os.sched_getaffinity(0))
    expected = affinity if quota is None else max(1, min(affinity, -(-quota // 1)))
    assert available_cpus(root, proc_file) == expected


def test_prepare_starts_no_more_workers_than_the_quota(tmp_path, monkeypatch):
    root, proc_file = _cgroup(tmp_path, {"cpu.max": "100000 100000\n"}, "0::/\n")
    monkeypatch.setattr(workers_module, "CGROUP_ROOT", root)
    monkeypatch.setattr(workers_module, "PROC_CGROUP", proc_file)
    urls = [write_tar(tmp_path / f"in-{s}.tar", sample_members(f"k{s}", RGB_JPG)) for s in range(3)]
    assert _run(urls, tmp_path / "out", num_workers=0)["workers"] == 1


def _to_dev_full(marker: str):
    """open() that sends writes of files whose path holds marker to /dev/full: the kernel's ENOSPC."""
    def fake_open(path, mode="r", *args, **kwargs):
        if marker in os.fspath(path) and "w" in mode:
            return builtins.open("/dev/full", mode, *args, **kwargs)
        return builtins.open(path, mode, *args, **kwargs)
    return fake_open


@pytest.fixture
def two_datasets(tmp_path) -> tuple[list[Path], list[Path]]:
    a = [write_tar(tmp_path / f"a{s}.tar", [m for i in range(3) for m in sample_members(f"a{s}_{i}", RGB_JPG)])
         for s in range(2)]
    b = [write_tar(tmp_path / "b.tar", [m for i in range(4) for m in sample_members(f"b{i}", RGB_JPG)])]
    return a, b


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize(("module", "marker", "published"), [(prepare_module, "part-", False),
                                                             (shards_module, "shard-", False),
                                                             (pcm.atomic, "index.json", True)])
def test_a_full_disk_fails_the_stage_and_keeps_the_previous_data(tmp_path, two_datasets, monkeypatch, module,
                                                                 marker, published):
    a, b = two_datasets
    out = tmp_path / "out"
    _run(a, out)
    before = _snapshot(out)
    monkeypatch.setattr(module, "open", _to_dev_full(marker), raising=False)
    with pytest.raises(OutputError, match="No space left on device.*the disk is full") as failure:
        _run(b, out)
    assert isinstance(failure.value, PrepareError) and isinstance(failure.value, RuntimeError)  # CLI: exit 2
    assert not list(out.glob(".staging*"))  # the failed run gave its space back
    if published:  # the full disk hit index.json itself: the folder says it is incomplete
        assert "has no index.json until" in str(failure.value) and not (out / "index.json").exists()
        with pytest.raises(FileNotFoundError, match="run `pcm prepare`"):
            PreparedShards(out, 2, 0)
    else:
        assert "nothing was published" in str(failure.value) and _snapshot(out) == before
    monkeypatch.undo()
    assert _run(b, out)["samples_written"] == 4  # space is back: the rerun completes


def _consistent(out: Path) -> str:
    """'none' (no index.json: incomplete, refused by the loader), or the samples of a complete run: every shard the
    index names exists with the recorded sha256 and sample count, and no other shard is there."""
    if not (out / "index.json").exists():
        return "none"
    shards = json.loads((out / "index.json").read_text())["shards"]
    assert sorted(p.name for p in out.glob("shard-*.tar")) == [s["name"] for s in shards]
    for shard in shards:
        data = (out / shard["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(list(iter_tar(io.BytesIO(data)))) == shard["samples"]
    return ",".join(sorted(written_samples(out)))


def _prepare_and_die_at(urls, out, kill_at: int) -> None:
    """In a forked child: prepare, SIGKILLed at its kill_at-th fsync or rename (every step that makes a write durable
    or visible: the new shard's fsync, then each step of publishing)."""
    steps = [0]

    def dying(real):
        def step(*args):
            steps[0] += 1
            if steps[0] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return step

    os.replace, os.fsync = dying(os.replace), dying(os.fsync)  # this child's own os module only
    _run(urls, out)


@pytest.mark.slow
def test_a_kill_at_every_step_of_publishing_leaves_old_data_or_none(tmp_path, two_datasets):
    a, b = two_datasets
    out = tmp_path / "out"
    _run(a, out)
    old, new = _consistent(out), "b0,b1,b2,b3"
    context = multiprocessing.get_context("fork")
    seen = []
    for kill_at in range(1, 12):  # B: 1 shard fsync, the old index's removal fsync, 1 move, 2 atomic writes of 3
        child = context.Process(target=_prepare_and_die_at, args=(b, out, kill_at))
        child.start()
        child.join(60)
        seen.append(_consistent(out))
        assert seen[-1] in (old, "none", new)
        assert child.exitcode in (0, -signal.SIGKILL) and (child.exitcode != 0 or seen[-1] == new)
        _run(a, out)  # recovers whatever the kill left
        assert _consistent(out) == old
    assert seen[0] == old and seen[-1] == new and "none" in seen  # killed before, during and after publishing


@pytest.mark.parametrize(("turn", "top", "size"), [(6, "red", (40, 80)), (8, "blue", (40, 80)), (3, None, (80, 40))])
def test_phone_photos_are_turned_upright_before_resizing(tmp_path, turn, top, size):
    stored = np.zeros((40, 80, 3), np.uint8)
    stored[:, :40, 0] = 255  # left half red, right half blue, as the sensor stored it
    stored[:, 40:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = turn
    photo = io.BytesIO()
    Image.fromarray(stored).save(photo, format="JPEG", quality=95, exif=exif.tobytes())
    stats = _run([write_tar(tmp_path / "in.tar", sample_members("phone", photo.getvalue()))], tmp_path / "out")
    files = written_samples(tmp_path / "out")["phone"]
    meta = json.loads(files["json"])
    assert (meta["original_width"], meta["original_height"]) == size  # upright
    pixels = np.asarray(Image.open(io.BytesIO(files["png"])), dtype=int)
    red_top = pixels[2, 16, 0] > 200 and pixels[2, 16, 2] < 60
    if top is None:  # 180 degrees: red is now on the right
        assert pixels[16, 29, 0] > 200 and pixels[16, 2, 2] > 200
    else:
        assert red_top == (top == "red") and pixels[29, 16, 0 if top == "blue" else 2] > 200
    assert _accounted(stats)


def test_formats_we_do_not_train_on_are_skipped_under_their_own_reason(tmp_path):
    members = []
    for fmt, ext in (("GIF", "gif"), ("TIFF", "tiff"), ("BMP", "bmp"), ("GIF", "jpg")):  # the last a GIF named .jpg
        members += sample_members(f"as_{ext}_{fmt.lower()}", image_bytes("RGB", fmt=fmt), ext)
    members += sample_members("fine", RGB_JPG)
    stats = _run([write_tar(tmp_path / "in.tar", members)], tmp_path / "out")
    assert stats["skipped"] == {"unsupported_format": 4} and stats["samples_written"] == 1 and _accounted(stats)


def test_a_folder_without_json_prepares_under_the_default_condition(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(RGB_JPG)
        (folder / f"p{i}.txt").write_text(f"my photo {i}")
    (folder / "q.jpg").write_bytes(RGB_JPG)
    (folder / "q.txt").write_text("a failed download")
    (folder / "q.json").write_text('{"status": "failed_to_download"}')
    cfg = load_config(ROOT / "params.yaml", [f"data.inputs=['{folder}']", f"data.output_dir={tmp_path / 'out'}"])
    assert cfg.data.require_json == {"status": "success"}  # the project's default
    stats = prepare(cfg.data, cfg.seed, progress=False)
    assert stats["samples_written"] == 3 and stats["samples_without_json"] == 3
    assert stats["skipped"] == {"json_condition": 1} and _accounted(stats)  # the condition applies where json is


def test_latents_are_keyed_on_the_prepared_data(tmp_path, two_datasets):
    a, b = two_datasets
    cfg = config_from_dict({"data": {"output_dir": str(tmp_path / "out")}})
    _run(a, tmp_path / "out")
    key_a = latents_key(cfg)
    folder = precomputed_dir(cfg)  # latents as `pcm precompute` leaves them (complete: index.json with latents)
    folder.mkdir(parents=True)
    from pcm.data.precompute import teacher_key
    (folder / "meta.json").write_text(json.dumps({"key": key_a, "teacher_key": teacher_key(cfg)}))
    (folder / "index.json").write_text(json.dumps({"latents": True, "shards": []}))
    assert find_latents(cfg) == folder
    _run(b, tmp_path / "out")  # other data under the same output_dir
    assert latents_key(cfg) != key_a and find_latents(cfg) is None  # the stale latents are not trained on
    _run(a, tmp_path / "out")  # the same data again: the same bytes, the same key, the latents are valid again
    assert latents_key(cfg) == key_a and find_latents(cfg) == folder


@pytest.mark.parametrize("num_workers", [0, 2])
def test_the_loader_fails_clearly_on_an_epoch_with_nothing_decodable(tmp_path, num_workers):
    writer = ShardWriter(tmp_path, shard_size=6)
    for n in range(6):
        meta = {"original_height": 8, "original_width": 8, "crop_top": 0, "crop_left": 0}
        writer.write(f"k{n}", {"png": b"not a png", "txt": b"c", "json": json.dumps(meta).encode()})
    writer.close()
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"name": writer.names[0], "samples": 6}]}))

    def spinning(*_):
        raise TimeoutError("the loader spun without yielding or failing")

    previous = signal.signal(signal.SIGALRM, spinning)
    signal.alarm(30)
    try:
        with pytest.raises(EmptyEpochError, match=r"epoch 0: none of the \d+ records .* could be decoded .*k\d"):
            next(iter(make_loader(tmp_path, batch_size=2, seed=0, num_workers=num_workers, shuffle_buffer=4)))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    assert issubclass(EmptyEpochError, RuntimeError)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False


def _prepare_with_hanging_workers(urls, out, pids: Path) -> None:
    def hang(*_):
        with open(pids, "a") as f:
            f.write(f"{os.getpid()}\n")
        signal.pause()

    prepare_module.process_sample = hang  # this forked child's copy of the module only
    _run(urls, out)


def test_workers_of_a_killed_stage_die_with_it(tmp_path, two_datasets):
    """A stage killed with SIGKILL runs no cleanup; its workers must not live on (and write into a rerun's files)."""
    a, _ = two_datasets
    pids = tmp_path / "pids"
    child = multiprocessing.get_context("fork").Process(target=_prepare_with_hanging_workers,
                                                        args=(a, tmp_path / "out", pids))
    child.start()
    for _ in range(200):  # both workers are inside a sample
        if pids.exists() and len(pids.read_text().split()) == 2:
            break
        time.sleep(0.05)
    workers = [int(p) for p in pids.read_text().split()]
    try:
        assert len(workers) == 2 and all(map(_alive, workers))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        for _ in range(100):
            if not any(map(_alive, workers)):
                break
            time.sleep(0.05)
        assert not any(map(_alive, workers))
    finally:  # should the guard ever fail, the paused workers must not outlive the test
        for pid in filter(_alive, workers):
            os.kill(pid, signal.SIGKILL)


def test_workers_fork_safely_after_the_parent_decoded_video(tmp_path, monkeypatch):
    """Uncollected garbage of the parent holding decoded frames (their ffmpeg scaler owns slice threads) must not be
    freed in a forked worker: freeing it there joins threads that exist only in the parent, and the worker hangs."""
    import gc

    import av

    from pcm.data.video import encode_video

    clip = encode_video(np.full((4, 48, 64, 3), 90, np.uint8), fps=8)
    real = prepare_module.process_sample

    def collecting(*args):  # the worker's collector runs, as it does after its first few hundred allocations
        gc.enable()
        gc.collect()
        return real(*args)

    monkeypatch.setattr(prepare_module, "process_sample", collecting)
    gc.disable()  # the cycle stays uncollected until the fork, as it would between two automatic collections
    try:
        with av.open(io.BytesIO(clip)) as container:
            frames = list(container.decode(video=0))
        for frame in frames:  # each decoded frame keeps the scaler it used
            frame.reformat(width=64, height=48, format="rgb24")
        cycle = [frames]
        cycle.append(cycle)
        del frames, frame, cycle
        previous = signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("a worker hung")))
        signal.alarm(30)
        try:
            stats = _run([write_tar(tmp_path / "in.tar", sample_members("clip", clip, "mp4"))], tmp_path / "out",
                         modality="video", frames=2, num_workers=1)
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    finally:
        gc.enable()
    assert stats["samples_written"] == 1 and stats["shards_failed"] == []
