"""Kubeflow components: one lightweight Python component per pipeline stage, each a thin wrapper over pcm.stages.

Every component receives the whole params file as text (`params`) plus `overrides` (dotted key=value), points the
config's paths at its artifacts, calls one `pcm.stages` function and writes typed outputs. They run in the project
image built by the Dockerfile (it holds kfp, so no task pip-installs it); set PCM_IMAGE before importing this
package to use another image name.

The components are imported on first use (`components.distill`), not with the package: inside a running task kfp's
dsl is the executor's subset (no dsl.component), and a task imports only helpers from here (workdir, dvc_source).
"""

import importlib
import os

IMAGE = os.environ.get("PCM_IMAGE", "ghcr.io/pcm-pipelines/pcm:0.1.0")

_MODULES = {"demo_data": "data", "prepare": "data", "demo_teacher": "train", "distill": "train",
            "evaluate": "evaluate", "register": "register"}

__all__ = ["IMAGE", *_MODULES]


def __getattr__(name: str):
    if name not in _MODULES:
        raise AttributeError(f"module 'components' has no attribute {name!r}; components: {sorted(_MODULES)}")
    component = getattr(importlib.import_module(f"components.{_MODULES[name]}"), name)
    # importing components.evaluate binds the package's attribute `evaluate` to that submodule; the component takes
    # the name back, so a second pipeline compiled in the same process gets the component again
    globals()[name] = component
    return component
