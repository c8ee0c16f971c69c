"""Kubeflow: components are thin, both pipelines compile with their cluster settings, the multi-node manifests are
well formed, DVC-repo inputs are fetched, and the SD1.5 demo pipeline runs end to end under kfp.local."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT))  # components
sys.path.insert(0, str(Path(__file__).parent))


def _compile(tmp_path, name, *flags) -> list[dict]:
    out = tmp_path / f"{name}.yaml"
    subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{name}.py"), "compile", "-o", str(out), *flags],
                   check=True, capture_output=True, cwd=tmp_path)
    return list(yaml.safe_load_all(out.read_text()))


@pytest.mark.parametrize("name", ["pcm_sd15", "pcm_sdxl", "pcm_video"])
def test_the_pipeline_compiles_with_gpus_shm_pvcs_secrets_and_retries(tmp_path, name):
    spec, platform = _compile(tmp_path, name, "--gpus", "8", "--node-selector", "pool=h100")
    executors = spec["deploymentSpec"]["executors"]
    distill = next(e for key, e in executors.items() if "distill" in key)["container"]
    assert distill["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(distill["resources"]["accelerator"]["resourceCount"]) == 8
    assert distill["image"] == "ghcr.io/pcm-pipelines/pcm:0.1.0"
    tasks = {k: t for k, t in spec["root"]["dag"]["tasks"].items()}
    loop = next(t for k, t in tasks.items() if k.startswith("for-loop"))
    assert loop["parameterIterator"]["itemInput"]  # ParallelFor over the runs
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert inner["distill"]["retryPolicy"]["maxRetryCount"] == 3
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    distill_k8s = next(e for key, e in k8s.items() if "distill" in key)
    assert {"medium": "Memory", "mountPath": "/dev/shm", "volumeName": "dshm", "sizeLimit": "64Gi"} in \
        distill_k8s["emptyDirMounts"]
    mounts = {m["mountPath"]: m["constant"] for m in distill_k8s["pvcMount"]}
    assert mounts == {"/mnt/data": "pcm-data", "/mnt/work": "pcm-work"}
    assert distill_k8s["nodeSelector"]["labels"] == {"pool": "h100"}
    assert distill_k8s["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert any(s["secretName"] == "pcm-secrets" for s in distill_k8s["secretAsEnv"])
    assert all("pvcMount" in e for e in k8s.values())  # every task sees the data and work volumes
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert [r["name"] for r in defaults["runs"]["defaultValue"]] == ["pcm-m1", "pcm-m2", "pcm-m4", "lcm"]
    assert {"teacher_model", "shard_urls", "dvc_repo", "dvc_rev", "dvc_path", "mlflow_uri", "max_steps"} <= \
        set(defaults)


def test_components_are_thin_wrappers_over_pcm_stages():
    checked = 0
    for path in (ROOT / "components").glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any("component" in ast.unparse(d) for d in node.decorator_list):
                body = node.body[1:] if isinstance(node.body[0], ast.Expr) else node.body  # without the docstring
                lines = body[-1].end_lineno - body[0].lineno + 1
                assert lines <= 20, f"{path.name}:{node.name} has {lines} lines"
                assert "pcm import stages" in ast.get_source_segment(path.read_text(), node)
                checked = checked + 1
    assert checked == 6  # demo-data, prepare, demo-teacher, distill, evaluate, register


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_multinode_manifests(tmp_path, kind):
    import multinode

    out = tmp_path / "job.yaml"
    assert multinode.main(["--nodes", "4", "--gpus-per-node", "8", "--kind", kind, "-o", str(out)]) == 0
    job = yaml.safe_load(out.read_text())
    text = out.read_text()
    assert "--nproc_per_node=8" in text and "-m pcm.cli distill" in text and "--resume latest" in text
    if kind == "trainjob":
        assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 4
        assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    else:
        specs = job["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
        container = specs["Worker"]["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_shards_are_fetched_from_a_dvc_repository_at_a_revision(tmp_path):
    from components.dvc_source import fetch_dvc_path

    repo = tmp_path / "repo"
    (repo / "shards").mkdir(parents=True)
    (repo / "shards" / "00000.tar").write_bytes(b"first")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    dvc = str(Path(sys.executable).with_name("dvc"))
    for command in (["git", "init", "-q"], [dvc, "init", "-q"], [dvc, "add", "-q", "shards"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "v1"], ["git", "tag", "v1"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    (repo / "shards" / "00000.tar").write_bytes(b"second")
    for command in ([dvc, "add", "-q", "shards"], ["git", "commit", "-qam", "v2"]):
        subprocess.run(command, cwd=repo, env=env, check=True, capture_output=True)
    out = fetch_dvc_path(str(repo), "v1", "shards", tmp_path / "fetched")
    assert (out / "00000.tar").read_bytes() == b"first"  # the revision asked for, not the newest
    with pytest.raises(FileNotFoundError, match="nowhere not found"):
        fetch_dvc_path(str(repo), "v1", "nowhere", tmp_path / "x")


@pytest.mark.slow
def test_the_sd15_demo_pipeline_runs_under_kfp_local_and_registers_a_model(tmp_path):
    from test_dvc import TINY, _merge

    params = _merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pcm_sd15.py"), "--params",
                             str(tmp_path / "tiny.yaml"), "run", "--local", "--root", str(tmp_path / "root")],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    registered = [json.loads(p.read_text()) for p in (tmp_path / "root").rglob("registered")]
    assert len(registered) == 1 and registered[0]["version"] == 1 and registered[0]["model_name"]
    assert "champion" in registered[0]["aliases"]
    steps = next((tmp_path / "root").rglob("results")) / "steps.csv"
    rows = steps.read_text()
    assert "teacher-ddim" in rows and "pcm-M4" in rows and "lcm" in rows
    from mlflow import MlflowClient

    version = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_model_version_by_alias(params["register"]["model_name"],
                                                                                 "champion")
    assert str(version.version) == "1"
