"""Imports point downward (DESIGN.md §2, STYLE.md layers), checked on the source's import statements."""

import ast
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
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


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
