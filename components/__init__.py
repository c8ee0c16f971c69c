"""Kubeflow components: one lightweight Python component per pipeline stage, each a thin wrapper over pcm.stages.

Every component receives the whole params file as text (`params`) plus `overrides` (dotted key=value), points the
config's paths at its artifacts, calls one `pcm.stages` function and writes typed outputs. They run in the project
image built by the Dockerfile (it holds kfp, so no task pip-installs it); set PCM_IMAGE before importing this
package to use another image name.
"""

import os

IMAGE = os.environ.get("PCM_IMAGE", "ghcr.io/pcm-pipelines/pcm:0.1.0")

from components.data import demo_data, prepare  # noqa: E402
from components.evaluate import evaluate  # noqa: E402
from components.register import register  # noqa: E402
from components.train import demo_teacher, distill  # noqa: E402

__all__ = ["IMAGE", "demo_data", "demo_teacher", "distill", "evaluate", "prepare", "register"]
