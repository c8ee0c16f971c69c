"""`pcm prepare` on good and broken inputs: exact skip counts, every good sample written, reruns identical."""

import io
import json
import struct
import zlib
from pathlib import Path

import pytest
from builders import RGB_JPG, image_bytes, sample_members, write_tar, written_samples
from PIL import Image

from pcm.config import config_from_dict
from pcm.data.prepare import PrepareError, prepare
from pcm.data.urls import UrlError, expand_inputs


def _bomb_png(width=20000, height=20000) -> bytes:
    """A small PNG whose header claims width x height pixels (its pixel data is never decoded)."""
    data = bytearray(image_bytes("L", (8, 8)))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


GOOD = {  # key -> (image bytes, extension, converted mode)
    "good_rgb": (RGB_JPG, "jpg", None),
    "good_rgba": (image_bytes("RGBA"), "png", "RGBA"),
    "good_gray": (image_bytes("L"), "png", "L"),
    "good_cmyk": (image_bytes("CMYK", fmt="JPEG"), "jpg", "CMYK"),
    "good_palette": (image_bytes("P"), "png", "P"),
    "good_16bit": (image_bytes("I;16"), "png", "I;16"),
    "good_webp": (image_bytes("RGB", fmt="WEBP"), "webp", None),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("inputs")
    members = []
    for key, (data, ext, _) in GOOD.items():
        members += sample_members(key, data, ext)
    members += sample_members("zero_byte", b"")
    members += sample_members("not_an_image", b"this is not a jpeg at all")
    members += sample_members("one_pixel", image_bytes("RGB", (1, 1)), "png")
    members += sample_members("bomb", _bomb_png(), "png")
    members += sample_members("no_caption", RGB_JPG, caption=None)
    members += sample_members("bad_utf8", RGB_JPG, caption=b"caf\xe9 \xff\xfe")
    members += sample_members("long_caption", RGB_JPG, caption=b"x" * 100_000)
    members += sample_members("download_failed", RGB_JPG, meta={"status": "failed_to_download"})
    members += sample_members("too_wide", image_bytes("RGB", (400, 40)), "png")
    members += sample_members("good_rgb", RGB_JPG)  # the same key again within the shard
    members += sample_members("../../escape/evil", RGB_JPG)  # a key that would write outside the output folder
    write_tar(root / "mixed.tar", members)
    # three good samples, then the tar is cut inside the fourth sample's image
    truncated = []
    for i in range(4):
        truncated += sample_members(f"t{i}", RGB_JPG)
    full = write_tar(root / "full.tar", truncated).read_bytes()
    cut = full.index(b"t3.jpg") + 512 + len(RGB_JPG) // 2
    (root / "truncated.tar").write_bytes(full[:cut])
    (root / "full.tar").unlink()
    write_tar(root / "again.tar", sample_members("good_rgb", RGB_JPG) + sample_members("fresh", RGB_JPG))
    folder = root / "folder"
    folder.mkdir()
    for key in ("f0", "f1"):
        (folder / f"{key}.jpg").write_bytes(RGB_JPG)
        (folder / f"{key}.txt").write_text("a folder caption")
        (folder / f"{key}.json").write_text('{"status": "success"}')
    return {"root": root, "urls": [str(root / "mixed.tar"), f"file://{root}/truncated.tar",
                                   str(root / "missing-shard.tar"), str(root / "again.tar"), str(folder)]}


def _cfg(urls, out, **data):
    return config_from_dict({"data": {"inputs": list(urls), "output_dir": str(out), "resolution": 32,
                                      "min_side": 32, "shard_size": 4, "require_json": {"status": "success"},
                                      "num_workers": 2, **data}})


def test_every_broken_input_is_skipped_and_counted_and_every_good_sample_written(inputs, tmp_path):
    cfg = _cfg(inputs["urls"], tmp_path / "out")
    stats = prepare(cfg.data, cfg.seed, progress=False)
    assert stats["skipped"] == {
        "aspect_ratio": 1, "bad_key": 1, "caption_not_utf8": 1, "caption_too_long": 1, "duplicate_key": 2,
        "empty_image": 1,
        "json_condition": 1, "missing_caption": 1, "too_large": 1, "too_small": 1, "truncated_shard": 1,
        "unreadable_image": 1,
    }
    assert stats["converted"] == {"CMYK": 1, "I;16": 1, "L": 1, "P": 1, "RGBA": 1}
    expected_keys = set(GOOD) | {"t0", "t1", "t2", "fresh", "f0", "f1"}
    written = written_samples(tmp_path / "out")
    assert set(written) == expected_keys
    assert stats["samples_written"] == len(expected_keys) and stats["samples_read"] == 18 + 4 + 2 + 2
    assert stats["shards_written"] == 4  # 13 samples in shards of 4
    assert stats["samples_read"] == stats["samples_written"] + sum(stats["skipped"].values())  # nothing vanishes
    assert stats["samples_without_json"] == 0 and stats["workers"] == 2
    failed = {Path(f["url"].removeprefix("file://")).name: f["error"] for f in stats["shards_failed"]}
    assert set(failed) == {"truncated.tar", "missing-shard.tar"}
    assert "No such file" in failed["missing-shard.tar"]
    on_disk = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert on_disk["skipped"] == stats["skipped"] and on_disk["images_per_second"] > 0
    for key, files in written.items():
        image = Image.open(io.BytesIO(files["jpg"]))
        assert image.size == (32, 32) and image.mode == "RGB"
        meta = json.loads(files["json"])
        assert meta["key"] == key and meta["height"] == 32 and meta["source_json"] == {"status": "success"}
    rgba = json.loads(written["good_rgba"]["json"])
    # 64x48 -> 43x32, center crop of 32 columns starts at (43 - 32) // 2
    assert (rgba["original_width"], rgba["original_height"], rgba["crop_top"], rgba["crop_left"]) == (64, 48, 0, 5)


def test_reruns_are_byte_identical_whatever_the_worker_count(inputs, tmp_path):
    runs = []
    for workers, name in ((1, "a"), (2, "b")):
        cfg = _cfg(inputs["urls"], tmp_path / name, num_workers=workers, crop="random")
        prepare(cfg.data, cfg.seed, progress=False)
        runs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("shard-*.tar"))})
    assert runs[0] == runs[1] and len(runs[0]) == 4
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()


def test_rerun_with_fewer_samples_removes_stale_shards(inputs, tmp_path):
    out = tmp_path / "out"
    cfg = _cfg(inputs["urls"], out)
    prepare(cfg.data, cfg.seed, progress=False)
    small = _cfg([str(inputs["root"] / "again.tar")], out)
    prepare(small.data, small.seed, progress=False)
    assert sorted(p.name for p in out.glob("*")) == ["index.json", "shard-00000.tar", "stats.json"]


def test_nothing_readable_fails_with_a_clear_message(tmp_path):
    cfg = _cfg([str(tmp_path / "nope-{0..1}.tar")], tmp_path / "out")
    with pytest.raises(PrepareError, match=r"no sample could be read from any of the 2 input shard\(s\)"):
        prepare(cfg.data, cfg.seed, progress=False)
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["samples_read"] == 0


def test_pipe_urls_are_refused_unless_allowed(tmp_path):
    with pytest.raises(UrlError, match="data.allow_pipe_urls"):
        expand_inputs(["pipe:cat shard.tar"], allow_pipe_urls=False)
    assert expand_inputs(["pipe:cat a.tar"], allow_pipe_urls=True) == ["pipe:cat a.tar"]
    with pytest.raises(UrlError, match="unsupported URL scheme"):
        expand_inputs(["ftp://host/a.tar"], allow_pipe_urls=False)
    assert expand_inputs(["cc3m/{00000..00002}.tar"], False) == [f"cc3m/0000{i}.tar" for i in range(3)]
    cfg = _cfg(["pipe:touch " + str(tmp_path / "pwned")], tmp_path / "out")
    with pytest.raises(UrlError):
        prepare(cfg.data, cfg.seed, progress=False)
    assert not (tmp_path / "pwned").exists()


def test_http_shards_are_read_over_loopback(inputs, tmp_path):
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(inputs["root"]))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        cfg = _cfg([f"http://127.0.0.1:{port}/{{again,mixed}}.tar"], tmp_path / "out", num_workers=1)
        stats = prepare(cfg.data, cfg.seed, progress=False)
    finally:
        server.shutdown()
    assert stats["samples_written"] == len(GOOD) + 1 and stats["shards_failed"] == []


def test_decompression_guard_reads_only_the_header():
    from pcm.data.images import SkipSample, open_image

    with pytest.raises(SkipSample) as skip:
        open_image(image_bytes("RGB"), max_pixels=1000)  # 64 x 48 = 3072 pixels
    assert skip.value.reason == "too_large" and "data.max_pixels=1000" in str(skip.value)
    assert open_image(image_bytes("RGB"), max_pixels=3072).size == (64, 48)
