"""Run identity: a distill folder belongs to one run (manifest), a second run never resumes or exports the first."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from worlds import distill_world

from pcm import stages
from pcm.cli import main
from pcm.config import config_from_dict
from pcm.train.manifest import MANIFEST, RunManifest, RunMismatch, claim

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return distill_world(tmp_path_factory.mktemp("identity"), shards=2)


def _cfg(base, out, **sections):
    merged = {k: dict(v) for k, v in base.items()}
    for section, values in sections.items():
        merged[section] = {**merged.get(section, {}), **values}
    merged["train"]["output_dir"] = str(out)
    return config_from_dict(merged)


def _run_id(out) -> str:
    return json.loads((Path(out) / "mlflow_run.json").read_text())["run_id"]


def test_the_manifest_ignores_resumable_keys_and_names_the_others(world, tmp_path):
    root, base = world
    a = RunManifest.of(_cfg(base, tmp_path / "a"), root / "prepared")
    resumable = _cfg(base, tmp_path / "b", train={"max_steps": 50, "log_every": 7, "checkpoint_every": 3},
                     tracking={"experiment": "elsewhere"}, validation={"guidance_scale": 3.0})
    longer = RunManifest.of(resumable, root / "prepared")
    assert longer.differences(a) == [] and longer.config_hash == a.config_hash
    other = RunManifest.of(_cfg(base, tmp_path / "c", train={"learning_rate": 2e-3}, lora={"rank": 8}),
                           root / "prepared")
    assert other.differences(a) == ["lora.rank: 8 -> 4", "train.learning_rate: 0.002 -> 0.001"]


def test_a_fresh_run_refuses_a_used_folder_and_a_resume_refuses_another_runs_manifest(world, tmp_path):
    root, base = world
    out = tmp_path / "run"
    first = stages.distill(_cfg(base, out), progress=False)
    assert first["steps"] == 2 and (out / MANIFEST).is_file()
    first_run = _run_id(out)
    with pytest.raises(RunMismatch, match="already holds a run.*--resume latest.*--overwrite"):
        stages.distill(_cfg(base, out), progress=False)
    with pytest.raises(RunMismatch, match=r"differing \(1\): train.learning_rate: 0.001 -> 0.005"):
        stages.distill(_cfg(base, out, train={"learning_rate": 5e-3, "max_steps": 3}), resume="latest",
                       progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # nothing touched
    # a longer budget is the same run: it continues from step 2, in the same MLflow run
    assert stages.distill(_cfg(base, out, train={"max_steps": 3}), resume="latest", progress=False)["steps"] == 3
    assert _run_id(out) == first_run
    # --overwrite starts anew: step 0, a new MLflow run, none of the old run's checkpoints
    stages.distill(_cfg(base, out), overwrite=True, progress=False)
    assert _run_id(out) != first_run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2]


def test_re_prepared_data_or_another_teacher_is_another_run(world, tmp_path):
    root, base = world
    out = tmp_path / "run"
    stages.distill(_cfg(base, out, train={"max_steps": 1}), progress=False)
    prepared = tmp_path / "prepared"
    shutil.copytree(root / "prepared", prepared)
    assert RunManifest.of(_cfg(base, out, data={"output_dir": str(prepared)}), prepared).differences(
        RunManifest.read(out / MANIFEST)) == []  # the same bytes elsewhere are the same data
    shard = prepared / "shard-00001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # different data, same index
    with pytest.raises(RunMismatch, match="data digest"):
        stages.distill(_cfg(base, out, data={"output_dir": str(prepared)}, train={"max_steps": 2}), resume="latest",
                       progress=False)
    teacher = tmp_path / "teacher"
    shutil.copytree(base["teacher"]["model"], teacher)
    (teacher / "unet" / "extra.txt").write_text("another teacher folder")
    with pytest.raises(RunMismatch, match="teacher.files.model"):
        stages.distill(_cfg(base, out, teacher={"model": str(teacher)}, train={"max_steps": 2}), resume="latest",
                       progress=False)


def test_resume_from_a_checkpoint_path_checks_the_manifest_beside_it(world, tmp_path):
    root, base = world
    stages.distill(_cfg(base, tmp_path / "a", train={"max_steps": 1}), progress=False)
    checkpoint = str(tmp_path / "a" / "checkpoints" / "step-000001")
    with pytest.raises(RunMismatch, match="lora.rank: 4 -> 8"):
        claim(tmp_path / "b", RunManifest.of(_cfg(base, tmp_path / "b", lora={"rank": 8}), root / "prepared"),
              checkpoint, overwrite=False)
    (tmp_path / "a" / MANIFEST).write_text("{not json")
    with pytest.raises(RunMismatch, match="unreadable run manifest"):
        claim(tmp_path / "b", RunManifest.of(_cfg(base, tmp_path / "b"), root / "prepared"), checkpoint, False)


def test_the_cli_refuses_a_used_folder_in_one_line_with_exit_2(world, tmp_path, capsys):
    root, base = world
    out = tmp_path / "run"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({**base, "train": {**base["train"], "max_steps": 1, "output_dir": str(out)}}))
    assert main(["distill", "--params", str(params)]) == 0
    before = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    capsys.readouterr()
    assert main(["distill", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RunMismatch" in err[0] and str(out) in err[0], err
    after = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the old run's LoRA is untouched
    assert main(["distill", "--params", str(params), "--overwrite"]) == 0
