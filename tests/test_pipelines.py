"""Kubeflow: components are thin, every pipeline compiles with its cluster settings, the multi-node manifests are
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
IMAGE_PIPELINES = ["pcm_sd15", "pcm_sdxl", "pcm_sd3", "pcm_flux"]
PIPELINES = [*IMAGE_PIPELINES, "pcm_video"]


def _compile(tmp_path, name, *flags, params: Path | None = None) -> list[dict]:
    out = tmp_path / f"{name}.yaml"
    before = ["--params", str(params)] if params else []
    subprocess.run([sys.executable, str(ROOT / "pipelines" / f"{name}.py"), *before, "compile", "-o", str(out),
                    *flags], check=True, capture_output=True, cwd=tmp_path)
    return list(yaml.safe_load_all(out.read_text()))


def _tasks(spec: dict) -> dict:
    """Every container task of a compiled pipeline by task name, the ParallelFor's included."""
    tasks = {}
    for dag in [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]:
        tasks.update({k: t for k, t in dag["tasks"].items() if not k.startswith("for-loop")})
    return tasks


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Each pipeline compiled once for the cluster: (pipeline spec, platform spec, the spec-patch file's JSON)."""
    out = {}
    for name in PIPELINES:
        folder = tmp_path_factory.mktemp(name)
        spec, platform = _compile(folder, name, "--gpus", "8", "--node-selector", "pool=h100")
        out[name] = spec, platform, json.loads((folder / f"{name}.spec-patch.json").read_text())
    return out


@pytest.mark.parametrize("name", PIPELINES)
def test_the_pipeline_compiles_with_gpus_shm_pvcs_secrets_and_retries(compiled, name):
    spec, platform, _ = compiled[name]
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
    lcm = [] if name == "pcm_flux" else ["lcm"]  # FLUX: the reference's three SD3 runs, no LCM baseline
    assert [r["name"] for r in defaults["runs"]["defaultValue"]] == ["pcm-m1", "pcm-m2", "pcm-m4", *lcm]
    assert {"teacher_model", "shard_urls", "dvc_repo", "dvc_rev", "dvc_path", "mlflow_uri", "max_steps"} <= \
        set(defaults)


@pytest.mark.parametrize("name", PIPELINES)
def test_every_task_has_limits_retries_the_image_user_and_only_its_secret_keys(compiled, name):
    from cluster import MLFLOW, TASK_SECRETS

    spec, platform, _ = compiled[name]
    executors = spec["deploymentSpec"]["executors"]
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    expected = {"demo-data", "prepare", "demo-teacher", "distill", "evaluate", "register"} if name == "pcm_sd15" \
        else {"prepare", "distill", "evaluate", "register"}
    assert set(tasks) == expected
    for task_name, task in tasks.items():
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        resources = executors[executor]["container"]["resources"]
        assert resources["resourceCpuLimit"] and resources["resourceMemoryLimit"], task_name
        assert task["retryPolicy"]["maxRetryCount"] == 3, task_name
        config = k8s[executor]
        assert config["securityContext"] == {"runAsUser": "1000", "runAsGroup": "1000", "runAsNonRoot": True}
        assert config["podMetadata"]["annotations"]["pcm-pipelines/fs-group"] == "1000"
        keys = {k["secretKey"] for s in config["secretAsEnv"] for k in s["keyToEnv"]}
        assert keys == set(TASK_SECRETS[task_name]) and set(MLFLOW) <= keys, task_name
        assert ("AWS_SECRET_ACCESS_KEY" in keys) == (task_name == "prepare")  # object-store keys: prepare only
        assert ("HF_TOKEN" in keys) == (task_name in ("distill", "evaluate", "register"))  # they load the teacher
        gpus = int(resources.get("accelerator", {}).get("resourceCount", 0))
        # evaluate and register get a GPU where their params say eval.device / register.device: cuda (SDXL, video),
        # none in the CPU demo
        on_gpu = {"distill": 8} if name == "pcm_sd15" else {"distill": 8, "evaluate": 1, "register": 1}
        assert gpus == on_gpu.get(task_name, 0), task_name
        assert ("nodeSelector" in config) == (gpus > 0), task_name  # --node-selector pins the GPU tasks only


def test_the_sd3_pipeline_compiles_the_reference_run_on_its_teacher(compiled):
    """pipelines/pcm_sd3.py: configs/sd3-cc3m.yaml as the package's params (the PCM authors' SD3 grid and LoRA, no
    adversarial loss) and SD3 medium as the default teacher."""
    spec, _, _ = compiled["pcm_sd3"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["teacher_model"]["defaultValue"] == "stabilityai/stable-diffusion-3-medium-diffusers"
    params = json.loads(defaults["params"]["defaultValue"])
    assert params["teacher"]["family"] == "sd3" and params["adversarial"]["weight"] == 0
    assert (params["distill"]["num_solver_steps"], params["lora"]["rank"], params["lora"]["alpha"]) == (100, 32, 8.0)


def test_the_flux_pipeline_compiles_its_run_on_flux_dev(compiled):
    """pipelines/pcm_flux.py: configs/flux-cc3m.yaml as the package's params (the reference's SD3 grid and LoRA on
    FLUX.1-dev: one teacher call per solver step at embedded guidance 1 + w = 3.5, the student's own; bf16; the
    resolution that fixes FLUX's shift) and FLUX.1-dev, gated, as the default teacher: the tasks that load it get
    HF_TOKEN (test_every_task_has_limits_retries_the_image_user_and_only_its_secret_keys)."""
    from pcm.config import config_from_yaml
    from pcm.models.families import FLUX_GUIDANCE_SCALE

    spec, _, _ = compiled["pcm_flux"]
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["teacher_model"]["defaultValue"] == "black-forest-labs/FLUX.1-dev"
    assert (defaults["register_method"]["defaultValue"], defaults["register_phases"]["defaultValue"]) == ("pcm", 4)
    params = config_from_yaml(defaults["params"]["defaultValue"])  # JSON: the package carries it as one line
    assert params.teacher.family == "flux" and params.adversarial.weight == 0 and params.data.resolution == 1024
    assert 1 + params.distill.w_min == 1 + params.distill.w_max == FLUX_GUIDANCE_SCALE
    assert (params.distill.num_solver_steps, params.lora.rank, params.lora.alpha) == (100, 32, 8.0)
    assert params.train.mixed_precision == "bf16" and params.teacher.max_sequence_length == 512


def test_evaluate_and_register_gpus_are_compile_options(tmp_path):
    spec, platform = _compile(tmp_path, "pcm_sdxl", "--gpus", "4", "--eval-gpus", "2", "--register-gpus", "0")
    executors = spec["deploymentSpec"]["executors"]
    gpus = {key: int(e["container"]["resources"].get("accelerator", {}).get("resourceCount", 0))
            for key, e in executors.items()}
    assert gpus == {"exec-prepare": 0, "exec-distill": 4, "exec-evaluate": 2, "exec-register": 0}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-evaluate"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "tolerations" not in k8s["exec-register"]
    params = yaml.safe_load((ROOT / "configs" / "sdxl-cc3m.yaml").read_text())
    params["register"]["device"] = "cpu"  # the default follows the params: a CPU register asks for no GPU
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    spec, _ = _compile(tmp_path, "pcm_sdxl", params=tmp_path / "p.yaml")
    register = spec["deploymentSpec"]["executors"]["exec-register"]["container"]["resources"]
    assert "accelerator" not in register and register["resourceCpuLimit"] == "4"
    assert "accelerator" in spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["resources"]


def test_pipeline_scripts_report_bad_input_in_one_line(tmp_path):
    """What a user mistypes is one line on stderr naming the problem (and the script by its real file name)."""
    (tmp_path / "twice.yaml").write_text("seed: 1\nseed: 2\n")
    (tmp_path / "broken.yaml").write_text("distill: [1, 2\n")
    (tmp_path / "zero.yaml").write_text("distill:\n  num_phases: 0\n")
    cases = [(["--params", "missing.yaml", "compile", "-o", "x.yaml"], "params file missing.yaml not found"),
             (["--params", "twice.yaml", "compile", "-o", "x.yaml"], "twice.yaml: line 2: duplicate key 'seed'"),
             (["--params", "broken.yaml", "compile", "-o", "x.yaml"], "broken.yaml: line 2, column 1"),
             (["--params", "zero.yaml", "compile", "-o", "x.yaml"], "distill.num_phases=0"),
             (["compile", "-o", "x.yaml", "--node-selector", "pool"], "'pool': expected KEY=VALUE"),
             (["compile", "-o", "x.yaml", "--eval-gpus", "-1"], "expected a GPU count >= 0"),
             (["run", "--local", "--arg", "max_steps=ten"], "expected NAME=JSON")]
    for argv, fragment in cases:
        out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pcm_sdxl.py"), *argv], cwd=tmp_path,
                             capture_output=True, text=True)
        assert out.returncode == 2, (argv, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.startswith("python pipelines/pcm_sdxl.py") and fragment in out.stderr, out.stderr
    assert not (tmp_path / "x.yaml").exists()


def test_every_pipeline_option_has_help_and_the_usage_names_the_file():
    import argparse

    import common

    parser = common._parser("pcm_sdxl.py", "pcm-sdxl", ROOT / "configs" / "sdxl-cc3m.yaml")
    assert parser.format_usage().startswith("usage: python pipelines/pcm_sdxl.py ")
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for prog, p in [("", parser), *commands.items()]:
        for action in p._actions:
            if not isinstance(action, argparse._SubParsersAction):
                assert action.help, (prog, action.option_strings)


@pytest.mark.parametrize("name", PIPELINES)
def test_the_package_parses_strictly_as_kfp_kubernetes_config(compiled, name):
    """The KFP API server's compiler reads each task's Kubernetes config with strict protojson: a key outside
    kfp-kubernetes' KubernetesExecutorConfig would fail `kfp run create`. Python's json_format is as strict."""
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    _, platform, _ = compiled[name]
    for label, config in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items():
        json_format.ParseDict(config, pb.KubernetesExecutorConfig())  # raises on an unknown field
        assert label.startswith("exec-")
    with pytest.raises(json_format.ParseError, match="terminationGracePeriodSeconds"):
        json_format.ParseDict({"terminationGracePeriodSeconds": 600}, pb.KubernetesExecutorConfig())


@pytest.mark.parametrize("name", IMAGE_PIPELINES)
def test_the_grace_period_and_fs_group_reach_the_pods_through_the_spec_patch(compiled, name):
    spec, platform, patch = compiled[name]
    pod = json.loads(patch["podSpecPatch"])  # Argo merges it into every pod of the run
    assert pod["terminationGracePeriodSeconds"] == 600  # pipeline.termination_grace_seconds of the params
    assert pod["securityContext"] == {"fsGroup": 1000, "fsGroupChangePolicy": "OnRootMismatch"}
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert k8s["exec-distill"]["podMetadata"]["annotations"]["pcm-pipelines/termination-grace-seconds"] == "600"
    assert "pcm-pipelines/termination-grace-seconds" not in k8s["exec-register"]["podMetadata"]["annotations"]


def test_the_grace_period_comes_from_the_params_file(tmp_path):
    params = yaml.safe_load((ROOT / "configs" / "sdxl-cc3m.yaml").read_text())
    params["pipeline"]["termination_grace_seconds"] = 900
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(params))
    _, platform = _compile(tmp_path, "pcm_sdxl", params=tmp_path / "p.yaml")
    patch = json.loads((tmp_path / "pcm_sdxl.spec-patch.json").read_text())
    assert json.loads(patch["podSpecPatch"])["terminationGracePeriodSeconds"] == 900
    annotations = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-distill"]["podMetadata"]
    assert annotations["annotations"]["pcm-pipelines/termination-grace-seconds"] == "900"
    from pcm.config import ConfigError, config_from_yaml

    params["pipeline"]["termination_grace_seconds"] = 10
    with pytest.raises(ConfigError, match="termination_grace_seconds=10: must be >= 30"):
        config_from_yaml(yaml.safe_dump(params))


@pytest.mark.parametrize("name", IMAGE_PIPELINES)
def test_work_folders_are_scoped_by_the_pipeline_run(compiled, name):
    """distill and evaluate get KFP's run id (resolved per run, the same in every retry) and continue_run."""
    from kfp import dsl

    spec, _, _ = compiled[name]
    assert spec["root"]["inputDefinitions"]["parameters"]["continue_run"]["defaultValue"] == ""
    tasks = _tasks(spec)
    # each distillation has its own folder: run_name is the ParallelFor item's name, not one constant for all
    run_name = tasks["distill"]["inputs"]["parameters"]["run_name"]
    assert run_name["parameterExpressionSelector"] == 'parseJson(string_value)["name"]'
    for task_name in ("distill", "evaluate"):
        inputs = tasks[task_name]["inputs"]["parameters"]
        assert inputs["pipeline_run"]["runtimeValue"]["constant"] == dsl.PIPELINE_JOB_ID_PLACEHOLDER
        assert "continue_run" in json.dumps(inputs["continue_run"])  # the pipeline parameter, not a constant
        assert "work_root" in json.dumps(inputs["work_root"])


def test_a_retry_resumes_a_new_run_starts_fresh_and_continue_run_picks_an_earlier_one(tmp_path):
    from components.workdir import run_folder

    work = str(tmp_path / "work")
    first = run_folder(work, "run-a", "", "/scratch")
    assert first == run_folder(work, "run-a", "", "/scratch")  # a retried task: same run id, same folder
    assert run_folder(work, "run-b", "", "/scratch") != first  # a new pipeline run (or a concurrent one)
    Path(first).mkdir(parents=True)
    assert run_folder(work, "run-b", "run-a", "/scratch") == first  # run b continues run a
    with pytest.raises(FileNotFoundError, match=r"continue_run='run-x'.*runs there: \['run-a'\]"):
        run_folder(work, "run-b", "run-x", "/scratch")
    with pytest.raises(ValueError, match="cannot name a folder"):
        run_folder(work, "{{$.pipeline_job_uuid}}", "", "/scratch")  # an unresolved placeholder
    with pytest.raises(ValueError, match="cannot name a folder"):
        run_folder(work, "run-b", "../run-a", "/scratch")
    assert run_folder("", "run-a", "", "/scratch") == "/scratch"  # kfp.local without a work PVC
    with pytest.raises(ValueError, match="needs work_root"):
        run_folder("", "run-b", "run-a", "/scratch")


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


def _multinode(tmp_path, kind: str, *flags) -> list[dict]:
    import multinode

    out = tmp_path / f"{kind}.yaml"
    assert multinode.main(["--nodes", "4", "--gpus-per-node", "8", "--kind", kind, "-o", str(out), *flags]) == 0
    return list(yaml.safe_load_all(out.read_text()))


def _pod_and_container(kind: str, docs: list[dict]) -> tuple[dict, dict]:
    """(the pod spec with the grace period and securityContext, the container spec with command and env)."""
    if kind == "trainjob":
        runtime, job = docs
        pod = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
        return pod, job["spec"]["trainer"]
    pod = docs[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    return pod, pod["containers"][0]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_multinode_manifests(tmp_path, kind):
    docs = _multinode(tmp_path, kind, "--run-id", "r1", "--run-name", "pcm-m4")
    text = yaml.safe_dump_all(docs)
    assert "--nproc_per_node=8" in text and "-m pcm.cli distill" in text and "--resume latest" in text
    pod, container = _pod_and_container(kind, docs)
    assert pod["terminationGracePeriodSeconds"] == 600  # pipeline.termination_grace_seconds
    assert pod["securityContext"]["fsGroup"] == 1000 and pod["securityContext"]["runAsUser"] == 1000
    assert "exec torchrun" in container["command"][-1] and "--shutdown-timeout=585" in container["command"][-1]
    assert "train.output_dir=/mnt/work/runs/r1/pcm-m4" in container["command"][-1]
    assert {"name": "WORK", "value": "/mnt/work/runs/r1/pcm-m4"} in container["env"]
    assert {e["name"] for e in container["env"]} == {"WORK", "HF_TOKEN", "MLFLOW_TRACKING_TOKEN"}  # no AWS keys
    if kind == "trainjob":
        runtime, job = docs
        assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 4
        assert job["spec"]["trainer"]["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
        assert job["spec"]["runtimeRef"] == {"name": "pcm-pcm-m4-r1", "kind": "TrainingRuntime",
                                             "apiGroup": "trainer.kubeflow.org"}
        assert runtime["kind"] == "TrainingRuntime" and runtime["metadata"]["name"] == "pcm-pcm-m4-r1"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    else:
        specs = docs[0]["spec"]["pytorchReplicaSpecs"]
        assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 3
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
        assert docs[0]["metadata"]["name"] == "pcm-pcm-m4-r1"


def test_each_generated_manifest_is_a_new_run_unless_a_run_id_is_given(tmp_path, capsys):
    runs = []
    for i in range(2):
        (tmp_path / str(i)).mkdir()
        runs.append(_multinode(tmp_path / str(i), "pytorchjob"))
    first, second = runs
    assert first[0]["metadata"]["name"] != second[0]["metadata"]["name"]
    again = _multinode(tmp_path, "pytorchjob", "--run-id", first[0]["metadata"]["name"].rsplit("-", 1)[1])
    assert again[0]["metadata"]["name"] == first[0]["metadata"]["name"]  # continues the first run's folder
    import multinode

    assert multinode.main(["--nodes", "1", "--grace-seconds", "10", "-o", str(tmp_path / "x.yaml")]) == 2
    assert multinode.main(["--nodes", "1", "-o", str(tmp_path / "no" / "x.yaml")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0] == ("python pipelines/multinode.py: error: --grace-seconds must be > 15 (torchrun waits 15 s "
                         "less for its workers' checkpoint)")
    assert errors[1].startswith("python pipelines/multinode.py: error: -o ") and "No such file" in errors[1]
    assert all(a.help for a in multinode.parser()._actions), "every option says what it does"


FAKE_TORCHRUN = """#!{python} -S
import os, signal, sys, time

def on_term(signum, frame):  # a worker saves its checkpoint and exits 143 (README: Failure modes)
    with open(os.environ["FAKE_MARKER"], "w") as f:
        f.write(" ".join(sys.argv[1:]))
    os._exit(143)

signal.signal(signal.SIGTERM, on_term)
started = os.environ["FAKE_MARKER"] + ".started"
with open(started + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(started + ".tmp", started)
deadline = time.monotonic() + 60  # never outlives a failed test by long
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


def _kill_leftovers(shell: subprocess.Popen, started: Path) -> None:
    """The shell and, when a shell without exec left it behind, the fake torchrun: only what this test started."""
    import signal

    if shell.poll() is None:
        shell.kill()
        shell.wait()
    if started.exists() and int(started.read_text()) != shell.pid:
        try:
            os.kill(int(started.read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_sigterm_to_the_pod_shell_reaches_torchrun(tmp_path, kind):
    """The manifest's own `sh -c` command with a fake torchrun on PATH: SIGTERM sent to the shell's pid (what the
    kubelet signals: the container's PID 1) reaches torchrun, and its exit code 143 is the container's."""
    import signal
    import time

    _, container = _pod_and_container(kind, _multinode(tmp_path, kind, "--run-id", "r1"))
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "torchrun"
    fake.write_text(FAKE_TORCHRUN.format(python=sys.executable))
    fake.chmod(0o755)
    work = tmp_path / "work"
    (work / "checkpoints" / "step-100").mkdir(parents=True)  # a checkpoint: the command adds --resume latest
    marker = tmp_path / "torchrun-got-sigterm"
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}", "WORK": str(work),
           "FAKE_MARKER": str(marker), "WORLD_SIZE": "4", "RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500", "PET_NNODES": "4", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "127.0.0.1",
           "PET_MASTER_PORT": "29500"}
    shell = subprocess.Popen(container["command"], env=env)
    try:
        started = Path(f"{marker}.started")
        deadline = time.monotonic() + 20
        while not started.exists():
            assert shell.poll() is None and time.monotonic() < deadline, "the fake torchrun never started"
            time.sleep(0.02)
        assert int(started.read_text()) == shell.pid  # exec: torchrun replaced the shell, it is the pod's PID 1
        shell.send_signal(signal.SIGTERM)
        assert shell.wait(timeout=20) == 143
    finally:
        _kill_leftovers(shell, Path(f"{marker}.started"))
    argv = marker.read_text()
    assert "--resume latest" in argv and "--shutdown-timeout=585" in argv and "--nnodes=4" in argv
    assert "--node_rank=1" in argv and "--master_addr=127.0.0.1" in argv


@pytest.mark.slow
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
    from builders import TINY_RUNS, tiny_params

    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pcm_sd15.py"), "--params",
                             str(tmp_path / "tiny.yaml"), "run", "--local", "--root", str(tmp_path / "root"),
                             "--arg", f"work_root={json.dumps(str(tmp_path / 'work'))}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the work folders are scoped by the run id kfp.local resolved for the placeholder
    runs = tmp_path / "work" / "runs"
    loras = sorted(runs.glob("*/*/lora"))
    assert sorted(p.parent.name for p in loras) == sorted(TINY_RUNS), loras
    assert len({p.parent.parent for p in loras}) == 1  # one pipeline run: one id for all its distillations
    assert list((loras[0].parent.parent / "eval-cache").iterdir())  # and for its evaluation's cache
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
