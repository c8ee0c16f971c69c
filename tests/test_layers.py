"""Imports point downward (the README's layout line), checked on the source's import statements.

The README's chain `math` <- `models` <- `train`/`sampling` <- `data`/`eval`/`registry` <- `stages` <- `cli` is read
from README.md itself, so the test checks the rule the README states. Beside it: the base module pcm.rng (torch and
the standard library only), the demo plugged in from pcm.stages only, the CLI, components and pipelines importing
through pcm.stages and pcm.config, and data preparation never importing training code."""

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PCM_LAYER = {  # module prefix -> pcm modules it must never import
    "pcm.math": ("pcm.config", "pcm.models", "pcm.train", "pcm.sampling", "pcm.data", "pcm.eval",
                 "pcm.registry", "pcm.stages", "pcm.cli", "pcm.demo"),
    "pcm.models": ("pcm.train", "pcm.sampling", "pcm.data", "pcm.eval", "pcm.registry", "pcm.stages", "pcm.cli"),
    "pcm.train": ("pcm.data", "pcm.eval", "pcm.registry", "pcm.stages", "pcm.cli"),  # may use sampling (same layer)
    "pcm.sampling": ("pcm.train", "pcm.data", "pcm.eval", "pcm.registry", "pcm.stages", "pcm.cli"),
    "pcm.config": ("pcm.math", "pcm.models", "pcm.train", "pcm.sampling", "pcm.stages", "pcm.cli"),
}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "pcm":  # `from pcm import stages` imports pcm.stages
            names.update(f"pcm.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


PCM_FILES = sorted((ROOT / "pcm").rglob("*.py"))


@pytest.mark.parametrize("path", sorted((ROOT / "pcm" / "math").glob("*.py")), ids=lambda p: p.name)
def test_pcm_math_imports_only_torch_and_the_standard_library(path):
    for name in _imports(path):
        top = name.split(".")[0]
        assert top == "torch" or name.startswith("pcm.math") or top in sys.stdlib_module_names, (path, name)


@pytest.mark.parametrize("path", PCM_FILES, ids=lambda p: _module_name(p))
def test_imports_point_downward_and_pcm_never_imports_kfp(path):
    module = _module_name(path)
    for name in _imports(path):
        assert name.split(".")[0] not in ("kfp", "dvc"), (module, name)
        for prefix, forbidden in PCM_LAYER.items():
            if module == prefix or module.startswith(prefix + "."):
                assert not name.startswith(forbidden), f"{module} imports {name}"


def test_math_import_pulls_in_no_third_party_package_but_torch():
    import subprocess

    code = ("import sys; before = set(sys.modules); import torch; after_torch = set(sys.modules); "
            "import pcm.math; print(sorted(m for m in set(sys.modules) - after_torch if not m.startswith('pcm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _readme_layers() -> list[tuple[str, ...]]:
    """The README's layout chain, lowest layer first: [("pcm.math",), ..., ("pcm.data", "pcm.eval", ...), ...]."""
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    chain = re.search(r"`pcm/` the library \((`math`.*?);", text)
    assert chain, "README.md lost its layout line (`pcm/` the library (`math` <- ... <- `cli`; ...)"
    return [tuple(f"pcm.{name}" for name in re.findall(r"`(\w+)`", layer)) for layer in chain.group(1).split("←")]


def _layer_of(module: str, layers: list[tuple[str, ...]]) -> int | None:
    return next((i for i, layer in enumerate(layers) if any(_within(module, p) for p in layer)), None)


def test_the_readme_chain_is_the_one_this_test_knows():
    assert _readme_layers() == [("pcm.math",), ("pcm.models",), ("pcm.train", "pcm.sampling"),
                                ("pcm.data", "pcm.eval", "pcm.registry"), ("pcm.stages",), ("pcm.cli",)]


@pytest.mark.parametrize("path", PCM_FILES, ids=lambda p: _module_name(p))
def test_no_module_imports_a_layer_above_its_own_in_the_readme_chain(path):
    layers = _readme_layers()
    module = _module_name(path)
    mine = _layer_of(module, layers)
    if mine is None:
        return
    above = [name for name in _imports(path) if (_layer_of(name, layers) or 0) > mine]
    assert above == [], f"{module} (layer {layers[mine]}) imports {above} from above it"


def test_the_keyed_randomness_is_a_base_module_of_torch_and_the_standard_library():
    for name in _imports(ROOT / "pcm" / "rng.py"):
        assert name.split(".")[0] in ("torch", *sys.stdlib_module_names), name


@pytest.mark.parametrize("path", sorted((ROOT / "pcm" / "data").glob("*.py")), ids=lambda p: p.name)
def test_data_preparation_never_imports_training_code(path):
    assert [name for name in _imports(path) if _within(name, "pcm.train")] == []


@pytest.mark.parametrize("path", PCM_FILES, ids=lambda p: _module_name(p))
def test_the_demo_world_plugs_in_from_stages_only(path):
    """Evaluation knows an interface (pcm.eval.known_world); pcm.stages builds it from pcm.demo."""
    module = _module_name(path)
    if _within(module, "pcm.demo") or module == "pcm.stages":
        return
    assert [name for name in _imports(path) if _within(name, "pcm.demo")] == [], module


CLI_MAY_IMPORT = ("pcm.__version__", "pcm.config", "pcm.stages",
                  "pcm.tracking")  # use_params_file: the MLflow store is chosen before any stage runs


def test_the_cli_reaches_the_library_through_stages():
    pcm_imports = {name for name in _imports(ROOT / "pcm" / "cli.py") if _within(name, "pcm")}
    assert "pcm.stages" in pcm_imports
    assert [name for name in pcm_imports if not any(_within(name, p) for p in CLI_MAY_IMPORT)] == []


@pytest.mark.parametrize("path", sorted([*(ROOT / "components").glob("*.py"), *(ROOT / "pipelines").glob("*.py")]),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_components_and_pipelines_are_wiring_over_stages_and_config(path):
    pcm_imports = [name for name in _imports(path) if _within(name, "pcm")]
    assert [name for name in pcm_imports if not _within(name, "pcm.stages") and not _within(name, "pcm.config")] == []
