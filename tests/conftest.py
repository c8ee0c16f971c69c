import os
import shutil

import pytest
from hypothesis import settings

settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True)
settings.load_profile("ci")

# `make test` runs two pytest-xdist workers on 2 cores: each computes on its share of the cores, and so do the pcm
# processes its tests start (torch reads OMP_NUM_THREADS), or 2 workers x 2 threads fight over 2 cores.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def pytest_configure(config):
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None):
        return  # the xdist controller runs no test: it imports neither torch nor the worlds (~7 s of CPU at start)
    import torch

    torch.set_num_threads(THREADS)

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


@pytest.fixture(autouse=True, scope="session")
def migrated_store_template(tmp_path_factory):
    """A new MLflow SQLite store runs every one of MLflow's schema migrations (1-2 s of CPU; a run of the suite makes
    about 20 in its own processes): here a new store starts as a copy of one migrated once per worker. The copy is
    the same database a migration makes; the tests then read and write a real store. Processes the tests start
    (stages under dvc or kfp, a server) migrate their own."""
    import mlflow.store.db.utils as db
    import mlflow.store.model_registry.sqlalchemy_store as registry
    import sqlalchemy

    migrate, template = db._initialize_tables, tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"

    def initialize(engine):
        if engine.url.get_backend_name() != "sqlite" or engine.url.database in (None, "", ":memory:"):
            return migrate(engine)
        if not template.exists():
            built = sqlalchemy.create_engine(f"sqlite:///{template}")
            migrate(built)
            built.dispose()
        engine.dispose()
        shutil.copyfile(template, engine.url.database)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db, "_initialize_tables", initialize)
        patch.setattr(registry, "_initialize_tables", initialize)  # imported by name there
        yield template


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state (mixed precision included); each run in a test is a new 'process'."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    """(root, params as a dict) of worlds.distill_world with 4 shards, built once per test module."""
    from worlds import distill_world

    return distill_world(tmp_path_factory.mktemp("distill"), shards=4)
