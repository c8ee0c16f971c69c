import os

import pytest
import torch
from hypothesis import settings
from worlds import distill_world

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci")

# `make test` runs two pytest-xdist workers on 2 cores: each computes on its share of the cores, and so do the pcm
# processes its tests start (torch reads OMP_NUM_THREADS), or 2 workers x 2 threads fight over 2 cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
torch.set_num_threads(THREADS)
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# The modules that run longest (end-to-end subprocesses, measured with --durations), longest first: under
# `--dist loadfile` a worker takes whole modules in this order, so no long one starts last and leaves a core idle.
LONGEST_FIRST = ["test_dvc.py", "test_distill.py", "test_pipelines.py", "test_checkpoint_faults.py",
                 "test_video_pipeline.py", "test_flow_pipeline.py", "test_registry.py", "test_gpu_check.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the other modules keep their order


@pytest.fixture(autouse=True, scope="session")
def mlflow_store(tmp_path_factory):
    """Every stage tracks to MLflow: in tests, to one throwaway SQLite store (never the repo's mlflow/); each xdist
    worker has its own tmp_path_factory, so its own store."""
    path = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{path}/mlflow.db"
    yield path


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included); each run in a test is a new 'process'."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    """(root, params as a dict) of worlds.distill_world with 4 shards, built once per test module."""
    return distill_world(tmp_path_factory.mktemp("distill"), shards=4)
