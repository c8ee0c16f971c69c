"""Input shards from a DVC repository: a path at a revision, fetched with dvc.api (no shell, no `dvc` subprocess).

It lives beside the components, not in pcm/: the library knows nothing of DVC or Kubeflow (the README's layout)."""

from pathlib import Path


def fetch_dvc_path(repo: str, rev: str, path: str, dest: str | Path) -> Path:
    """Downloads `path` (a DVC- or git-tracked file or folder, e.g. data/cc3m-shards) of the repository `repo`
    (a git URL or local path) at `rev` (branch, tag or commit; empty = the default branch) into dest; returns dest.
    Credentials for the DVC remote come from the environment, as for `dvc pull`."""
    from dvc.api import DVCFileSystem

    fs = DVCFileSystem(repo, rev=rev or None)
    if not fs.exists(path):
        raise FileNotFoundError(f"{path} not found in the DVC repository {repo} at revision {rev or 'HEAD'}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + ("/" if fs.isdir(path) else ""), str(dest) + "/", recursive=True)
    return dest
