"""The MLflow store behind the registry, for pcm.registry: connecting to it (a read never creates one), pointing
MLflow's fluent API at it for one block, and resolving a model URI to the version it names, with one-line errors
that name the URI and what the store does hold.

Why loading goes through the version's storage location and not `models:/...` itself: for a models:/ URI MLflow's
ModelsArtifactRepository writes a `registered_model_meta` file into the folder it downloads to, and with a local
artifact store (the embedded SQLite store's mlflow/artifacts) that folder *is* the artifact store, so every
`pcm sample --model` would write into the registry's artifacts. The storage location (file:///..., s3://...,
mlflow-artifacts:/...) loads the same files through the plain artifact repository, which only reads.
"""

import os
from contextlib import contextmanager
from pathlib import Path

import mlflow

from pcm.config import Config
from pcm.tracking import default_store, http_settings, project_root, sqlite_file, tracking_uri

SCHEMES = ("models:/", "runs:/", "file:", "s3://", "gs://", "wasbs://", "hdfs://", "mlflow-artifacts:/", "http://",
           "https://", "dbfs:/")


class RegistryError(ValueError):
    """What `pcm register` or loading a registered model refuses: a store that does not exist (for a read), a model
    URI that names nothing in it, metrics of another file, a LoRA file that is not the one the version recorded, an
    unreadable LoRA folder or metrics file. The message is one line."""


def connect(cfg: Config, read: bool = False):
    """An MlflowClient that answers. A read (sampling, loading) refuses a SQLite store whose file does not exist
    instead of creating an empty one; a write creates the embedded store's folder. Otherwise a RuntimeError naming
    the URI and saying nothing was lost."""
    from mlflow import MlflowClient

    uri = tracking_uri(cfg.tracking)
    http_settings(cfg.tracking)
    database = sqlite_file(uri)
    if database is not None and read and not database.is_file():
        where = (f"the default store of project {project_root()}; run from the project, pass its --params, or set "
                 "tracking.uri / MLFLOW_TRACKING_URI") if uri == default_store() else \
            "set tracking.uri / MLFLOW_TRACKING_URI to the store that holds the model"
        raise RegistryError(f"no MLflow store at {uri} ({database} does not exist; {where})")
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(uri)
    try:
        client.search_experiments(max_results=1)
    except Exception as err:
        done = "Nothing was read" if read else (f"Nothing was registered; the LoRA ({cfg.register.lora}) and the "
                                                f"evaluation metrics ({cfg.register.eval_metrics}) are unchanged on "
                                                "disk")
        raise RuntimeError(f"cannot reach the MLflow tracking store at {uri} ({type(err).__name__}: {err}). {done}. "
                           "Start the server (or fix tracking.uri / MLFLOW_TRACKING_URI) and try again") from err
    return client


@contextmanager
def tracking_store(uri: str):
    """MLflow's fluent API (start_run, log_model, load_model) pointed at uri inside the block only:
    mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which must not outlive the call."""
    previous_env, previous_uri = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_uri)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


def registered(client, limit: int = 10) -> str:
    """'NAME (versions 1-3; aliases candidate=3, champion=2), ...' of the store's registered models, or 'none'."""
    found = client.search_registered_models(max_results=limit + 1)
    parts = []
    for model in found[:limit]:
        numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{model.name}'"))
        versions = f"versions {numbers[0]}-{numbers[-1]}" if len(numbers) > 1 else \
            f"version {numbers[0]}" if numbers else "no versions"
        aliases = ", ".join(f"{a}={v}" for a, v in sorted(_aliases(client, model).items())) or "none"
        parts.append(f"{model.name} ({versions}; aliases {aliases})")
    return ", ".join(parts) + (", ..." if len(found) > limit else "") if parts else "none (run pcm register first)"


def _aliases(client, model) -> dict:
    aliases = getattr(model, "aliases", None)
    if aliases is None or isinstance(aliases, list):  # some stores return search results without them
        aliases = getattr(client.get_registered_model(model.name), "aliases", {}) or {}
    return dict(aliases)


def resolve(client, uri: str, store: str):
    """(version, URI to load) for a model URI: the ModelVersion and its storage location for models:/NAME@ALIAS
    and models:/NAME/VERSION; (None, uri) for other schemes (runs:/, file:, s3://, ...) and for a local model
    folder. RegistryError, one line naming the URI and what exists, when it names nothing."""
    if not uri.startswith("models:/"):
        if uri.startswith(SCHEMES) or (Path(uri) / "MLmodel").is_file():
            return None, uri
        raise RegistryError(f"--model {uri}: not a model URI; give models:/NAME@ALIAS or models:/NAME/VERSION "
                         f"(registered in {store}: {registered(client)})")
    ref = uri.removeprefix("models:/").rstrip("/")
    name, alias = ref.rsplit("@", 1) if "@" in ref else (ref.rpartition("/")[0] or ref, "")
    number = "" if alias or "/" not in ref else ref.rpartition("/")[2]
    known = {m.name: m for m in client.search_registered_models(filter_string=f"name='{name}'")}
    if name not in known:
        raise RegistryError(f"--model {uri}: no registered model {name!r} in {store} "
                            f"(registered: {registered(client)})")
    aliases = _aliases(client, known[name])
    numbers = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    have = (f"{name}: versions {', '.join(map(str, numbers)) or 'none'}; aliases "
            f"{', '.join(f'{a}={v}' for a, v in sorted(aliases.items())) or 'none'}")
    if alias:
        if alias not in aliases:
            raise RegistryError(f"--model {uri}: no alias {alias!r} on {name} in {store} ({have})")
        number = str(aliases[alias])
    if not number.isdigit() or int(number) not in numbers:
        raise RegistryError(f"--model {uri}: no version {number or '(none given)'} of {name} in {store} ({have}); "
                         f"give models:/{name}@ALIAS or models:/{name}/VERSION")
    return client.get_model_version(name, number), client.get_model_version_download_uri(name, number)
