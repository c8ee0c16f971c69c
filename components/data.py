"""Data components: the shapes demo world, and shards (a demo artifact, URLs, or a DVC repo path) -> prepared."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from components import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # the image has kfp
def demo_data(params: str, overrides: list, mlflow_uri: str, shards: Output[Dataset]):
    """The shapes demo world as img2dataset-layout shards (pcm.stages.demo_data)."""
    from pcm import stages
    from pcm.config import config_from_yaml

    cfg = config_from_yaml(params, [*overrides, f"demo.output_dir={shards.path}"], mlflow_uri)
    result = stages.demo_data(cfg, progress=False)
    shards.metadata.update({"images": result["images"], "shards": len(result["shards"])})


@dsl.component(base_image=IMAGE, install_kfp_package=False)  # the image has kfp
def prepare(params: str, overrides: list, mlflow_uri: str, shard_urls: list, dvc_repo: str, dvc_rev: str,
            dvc_path: str, prepared: Output[Dataset], shards: Input[Dataset] = None):
    """Shards -> prepared shards (pcm.stages.prepare). Inputs, first given wins: the shards artifact, a DVC repo's
    path at a revision (fetched with dvc.api), or shard URLs (local, s3://, gs://, http(s)://)."""
    import glob
    import json

    from pcm import stages
    from pcm.config import config_from_yaml

    if shards is not None:
        inputs = sorted(glob.glob(f"{shards.path}/*.tar"))
    elif dvc_repo:
        from components.dvc_source import fetch_dvc_path

        inputs = [str(fetch_dvc_path(dvc_repo, dvc_rev, dvc_path, prepared.path + "-input"))]
    else:
        inputs = shard_urls
    cfg = config_from_yaml(params, [*overrides, f"data.inputs={json.dumps(inputs)}",
                                    f"data.output_dir={prepared.path}"], mlflow_uri)
    result = stages.prepare(cfg, progress=False)
    prepared.metadata.update({"samples": result["samples_written"], "skipped": json.dumps(result["skipped"])})
