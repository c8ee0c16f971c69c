"""The demo-data and prepare stages through the command line, as a user runs them."""

import json
import tarfile

import pytest

from pcm.cli import main


@pytest.fixture
def demo_overrides(tmp_path):
    return [f"demo.output_dir={tmp_path}/shapes", "demo.num_images=40", "demo.shard_size=10",
            f"data.inputs={tmp_path}/shapes/shard-{{00000..00003}}.tar", f"data.output_dir={tmp_path}/prepared",
            "data.shard_size=16"]


def test_demo_data_then_prepare(tmp_path, demo_overrides, capsys):
    assert main(["demo-data", "--params", "params.yaml", *demo_overrides]) == 0
    first = {p.name: p.read_bytes() for p in (tmp_path / "shapes").glob("shard-*.tar")}
    assert len(first) == 4
    assert main(["demo-data", "--params", "params.yaml", *demo_overrides]) == 0  # seeded: identical rerun
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "shapes").glob("shard-*.tar")}
    capsys.readouterr()
    assert main(["prepare", "--params", "params.yaml", *demo_overrides]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["samples_written"] == 40 and stats["skipped"] == {} and stats["shards_written"] == 3
    with tarfile.open(tmp_path / "prepared" / "shard-00000.tar") as archive:
        names = archive.getnames()
        meta = json.loads(archive.extractfile(names[0]).read())
        caption = archive.extractfile(names[2]).read().decode()
    assert names[:3] == ["000000.json", "000000.png", "000000.txt"]
    assert meta["source_json"]["objects"] and meta["height"] == 32 and meta["original_height"] == 64
    assert meta["source_json"]["background"] in caption


def test_prepare_refuses_pipe_urls_with_the_key_to_set(tmp_path, capsys):
    code = main(["prepare", "--params", "params.yaml", "data.inputs=pipe:curl http://example.com/a.tar",
                 f"data.output_dir={tmp_path}/out"])
    assert code == 2 and "data.allow_pipe_urls" in capsys.readouterr().err
