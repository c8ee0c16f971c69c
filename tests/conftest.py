import os

import pytest
import torch
from hypothesis import settings
from worlds import distill_world

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci")
torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def mlflow_store(tmp_path_factory):
    """Every stage tracks to MLflow: in tests, to one throwaway SQLite store (never the repo's mlflow/)."""
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
