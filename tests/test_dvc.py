"""dvc.yaml: its params keys resolve to config fields, every stage's imported code is among its deps, and `dvc repro`
runs, caches and re-runs what changed."""

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from builders import TINY_RUNS, merge, tiny_params

from pcm.cli import STAGES
from pcm.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


PIPELINES = {"dvc.yaml": "params.yaml", "video/dvc.yaml": "configs/video-demo.yaml"}  # each one's params file


def _stages(pipeline: str = "dvc.yaml") -> dict:
    """A pipeline file's stages with foreach expanded over its params file's pipeline.distill_runs."""
    stages = yaml.safe_load((ROOT / pipeline).read_text())["stages"]
    runs = load_config(ROOT / PIPELINES[pipeline]).pipeline.distill_runs
    out = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            out[name] = stage
            continue
        assert stage["foreach"] == "${pipeline.distill_runs}"
        for key, run in runs.items():
            text = yaml.safe_dump(stage["do"]).replace("${key}", key)
            text = text.replace("${item.method}", run.method).replace("${item.num_phases}", str(run.num_phases))
            out[f"{name}@{key}"] = yaml.safe_load(text)
    return out


def _params_keys(pipeline: str, stage: dict) -> list[str]:
    """The stage's params keys: plain keys of params.yaml, or `{file: [keys]}` naming the pipeline's params file."""
    keys = []
    for entry in stage.get("params", []):
        if isinstance(entry, dict):
            assert list(entry) == [PIPELINES[pipeline]], entry
            keys += entry[PIPELINES[pipeline]]
        else:
            assert PIPELINES[pipeline] == "params.yaml", entry
            keys.append(entry)
    return keys


def _resolves(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_params_key_of_every_stage_resolves_to_a_config_field_and_is_in_the_params_file(pipeline):
    params_file = ROOT / PIPELINES[pipeline]
    tree = config_to_dict(load_config(params_file))
    written = yaml.safe_load(params_file.read_text())  # DVC reads the file itself: the key must be there
    keys = [(name, key) for name, stage in _stages(pipeline).items() for key in _params_keys(pipeline, stage)]
    assert len(keys) > 20
    assert [(name, key) for name, key in keys if not _resolves(tree, key)] == []
    assert [(name, key) for name, key in keys if not _resolves(written, key)] == []


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_the_evaluation_reads_exactly_the_distilled_loras_and_registers_the_m4_one(pipeline):
    cfg = load_config(ROOT / PIPELINES[pipeline])
    stages = _stages(pipeline)
    produced = {out for name, stage in stages.items() if name.startswith("distill@") for out in stage["outs"]}
    assert produced == {f"models/{name}" for name in cfg.pipeline.distill_runs}
    assert {str(Path(p).parent) for p in cfg.eval.loras} == produced
    assert set(cfg.eval.loras) <= set(stages["evaluate"]["deps"])
    assert cfg.register.lora in stages["register"]["deps"] and cfg.register.lora in cfg.eval.loras
    assert cfg.teacher.model in stages["evaluate"]["deps"] and cfg.demo_teacher.output_dir == cfg.teacher.model
    assert [cfg.demo_teacher.output_dir] == stages["demo-teacher"]["outs"]
    assert [cfg.data.output_dir] == stages["prepare"]["outs"] and cfg.data.output_dir in stages["demo-teacher"]["deps"]
    for name, stage in stages.items():  # every stage is a pcm command on the params file, from the repository root
        assert stage["cmd"].startswith(f"pcm {name.split('@')[0]} --params {PIPELINES[pipeline]}"), name
        assert stage.get("wdir", ".") == ("." if pipeline == "dvc.yaml" else ".."), name


def test_the_video_teacher_stage_depends_on_the_image_teacher_the_image_pipeline_makes():
    video = load_config(ROOT / PIPELINES["video/dvc.yaml"])
    image = _stages("dvc.yaml")["demo-teacher"]["outs"]
    assert video.demo_teacher.family == "animatediff" and [video.demo_teacher.image_teacher] == image
    assert video.demo_teacher.image_teacher in _stages("video/dvc.yaml")["demo-teacher"]["deps"]


def _module_file(name: str) -> Path | None:
    """pcm.data.prepare -> pcm/data/prepare.py, pcm.math -> pcm/math/__init__.py; None when name is no module."""
    base = ROOT.joinpath(*name.split("."))
    return next((f for f in (base.with_suffix(".py"), base / "__init__.py") if f.is_file()), None)


def _pcm_imports(tree: ast.AST) -> set[str]:
    """The pcm modules named by the import statements anywhere in tree (also the lazy ones inside functions)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:  # a name may be a submodule
            names.update(f"{node.module}.{a.name}" if _module_file(f"{node.module}.{a.name}") else node.module
                         for a in node.names)
    return {name for name in names if name.split(".")[0] == "pcm" and _module_file(name)}


CONFIG = "pcm.config"  # not a code dep: what a stage reads from it reaches DVC as the stage's params keys
NOT_DEPS = (CONFIG, "pcm")  # nor is the package root (its version and log setup shape no output)


def _stage_modules(function: str) -> set[str]:
    """The pcm modules `pcm <stage>` runs: those pcm.stages.<function> (and the stages helpers it calls) imports,
    then everything they import, transitively."""
    tree = ast.parse((ROOT / "pcm" / "stages.py").read_text(encoding="utf-8"))
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    todo, seen_functions = [functions[function]], set()
    modules = set()
    while todo:
        node = todo.pop()
        seen_functions.add(node.name)
        modules |= _pcm_imports(node)
        todo += [functions[name] for name in _called(node, functions) - seen_functions]
    closure, todo = set(), sorted(modules)
    while todo:
        name = todo.pop()
        if name in closure or name in NOT_DEPS or name.startswith(CONFIG + "."):
            continue
        closure.add(name)
        todo += sorted(_pcm_imports(ast.parse(_module_file(name).read_text(encoding="utf-8"))))
    return closure


def _called(node: ast.AST, functions: dict) -> set[str]:
    return {call.func.id for call in ast.walk(node)
            if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id in functions}


def _covered(path: Path, deps: list[str]) -> bool:
    relative = path.relative_to(ROOT)
    return any(relative == Path(dep) or Path(dep) in relative.parents for dep in deps)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_every_stage_lists_the_code_it_imports_among_its_deps(pipeline):
    """A change to any module a stage runs reruns the stage: its file, or a folder above it, is a dep."""
    missing = {}
    for name, stage in _stages(pipeline).items():
        modules = _stage_modules(STAGES[name.split("@")[0]][0])
        assert modules, name
        files = sorted({_module_file(module) for module in modules})
        if gaps := [str(f.relative_to(ROOT)) for f in files if not _covered(f, stage["deps"])]:
            missing[name] = gaps
    assert missing == {}


def test_the_import_graph_follows_lazy_imports_helpers_and_submodule_names():
    modules = _stage_modules("evaluate")
    assert {"pcm.eval.evaluate", "pcm.eval.clip_score", "pcm.inference", "pcm.math", "pcm.demo.features",
            "pcm.demo.oracle", "pcm.demo.motion", "pcm.data.loader", "pcm.models.families"} <= modules
    assert "pcm.rng" in _stage_modules("prepare") and "pcm.stages" not in modules and not set(NOT_DEPS) & modules
    assert {"pcm.launch", "pcm.atomic"} <= _stage_modules("distill")  # imported by the _launch helper
    assert not _covered(ROOT / "pcm" / "data" / "loader.py", ["pcm/data/load"])  # a folder, not a name prefix


def _repro(clone: Path, *command: str) -> str:
    """`dvc repro` in the clone, or the command given (a program beside this python, or a script of pipelines/)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own embedded store
    env.pop("OMP_NUM_THREADS", None)
    command = command or ("dvc", "repro")
    program = [sys.executable, str(ROOT / command[0])] if command[0].endswith(".py") else \
        [str(Path(sys.executable).with_name(command[0]))]
    result = subprocess.run([*program, *command[1:]], cwd=clone, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def _stale(clone: Path) -> dict:
    """`dvc status --json dvc.yaml`: the stages of the image pipeline whose deps or params changed since their
    last run."""
    result = subprocess.run([str(Path(sys.executable).with_name("dvc")), "status", "--json", "dvc.yaml"], cwd=clone,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def _ran(output: str) -> set[str]:
    """The stages that ran: dvc's "Running stage" lines, or dvc_repro's minutes of each."""
    return set(re.findall(r"Running stage '([^']+)'", output)) | set(re.findall(r"^  stage (\S+): ", output, re.M))


@pytest.mark.slow
def test_dvc_repro_in_a_clone_caches_and_reruns_only_what_a_param_change_touches(tmp_path):
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            (clone / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, clone / name.decode())
    for extra in ("dvc.yaml", "params.yaml", ".dvc/config"):  # present even before they are committed
        (clone / extra).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / extra, clone / extra)
    params = tiny_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    (clone / "params.yaml").write_text(yaml.safe_dump(params))
    pipeline = (clone / "dvc.yaml").read_text()
    for name in load_config(ROOT / "params.yaml").pipeline.distill_runs.keys() - TINY_RUNS.keys():
        dep = f"      - models/{name}/lora\n"  # evaluate's dep on a LoRA no run of the clone makes
        assert pipeline.count(dep) == 1, name
        pipeline = pipeline.replace(dep, "")
    (clone / "dvc.yaml").write_text(pipeline)
    subprocess.run(["git", "init", "-q"], cwd=clone, check=True)

    first = _repro(clone, "pipelines/dvc_repro.py", "--jobs", "2")  # as make demo: the distillations side by side
    runs = TINY_RUNS
    everything = {"demo-data", "prepare", "demo-teacher", "evaluate", "register", *(f"distill@{k}" for k in runs)}
    assert _ran(first) == everything
    assert {f"distill@{k}" for k in runs} == set(re.findall(r"^  stage (\S+): .*\(side by side\)$", first, re.M))
    rows = (clone / "reports" / "eval" / "steps.csv").read_text()
    assert "teacher-ddim" in rows and "pcm-M4" in rows and "lcm" in rows
    assert '"version": 1' in (clone / "models" / "registered.json").read_text()

    assert _ran(_repro(clone)) == set()  # nothing changed: nothing runs: dvc agrees with dvc_repro's record

    # A training param makes every distillation stale (dvc status names them, nothing else) ...
    (clone / "params.yaml").write_text(yaml.safe_dump(merge(params, {"train": {"learning_rate": 2e-3}})))
    assert set(_stale(clone)) == {f"distill@{k}" for k in runs}
    # ... and an evaluation param re-runs the evaluation and what reads it, never a distillation (a run of each
    # distillation would only prove the params above again, at two more `pcm` start-ups).
    (clone / "params.yaml").write_text(yaml.safe_dump(merge(params, {"eval": {"num_prompts": 4}})))
    assert _ran(_repro(clone)) == {"evaluate", "register"}
