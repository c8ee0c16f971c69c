"""Shard URLs: brace expansion, the allowed schemes, and opening them without a shell.

Local paths, file://, http(s)://, s3:// and gs:// (the last two through fsspec with s3fs / gcsfs installed).
`pipe:` URLs execute a shell command and are refused unless data.allow_pipe_urls is true.
"""

import shlex
import subprocess
from pathlib import Path
from typing import BinaryIO

from braceexpand import braceexpand

REMOTE_SCHEMES = ("http://", "https://", "s3://", "gs://")
SCHEMES = ("local path", "file://", *REMOTE_SCHEMES, "pipe: (only with data.allow_pipe_urls: true)")
FSSPEC_PACKAGES = {"s3://": "s3fs", "gs://": "gcsfs"}


class UrlError(ValueError):
    """A shard URL that is refused or malformed (not one that merely fails to open)."""


def expand_inputs(inputs: tuple[str, ...] | list[str], allow_pipe_urls: bool) -> list[str]:
    """Each input brace-expanded ('cc3m/{00000..00331}.tar'), in order; pipe: refused unless allowed."""
    urls = []
    for pattern in inputs:
        for url in braceexpand(pattern):
            if url.startswith("pipe:") and not allow_pipe_urls:
                raise UrlError(f"refusing {url!r}: pipe: URLs run shell commands; set data.allow_pipe_urls: true "
                               "only for inputs you wrote yourself")
            if "://" in url and not url.startswith(("file://", *REMOTE_SCHEMES)):
                raise UrlError(f"unsupported URL scheme in {url!r}; allowed: {', '.join(SCHEMES)}")
            urls.append(url)
    return urls


def local_path(url: str) -> Path | None:
    """The filesystem path of a local or file:// URL, else None."""
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def open_url(url: str) -> BinaryIO:
    """A binary stream over the URL's bytes; raises OSError (or the fsspec error) when it cannot be read."""
    path = local_path(url)
    if path is not None:
        return open(path, "rb")
    if url.startswith("pipe:"):  # only reachable when allow_pipe_urls was set (expand_inputs refuses otherwise)
        # split into argv and run without a shell: no redirections, globbing or command chaining
        return subprocess.Popen(shlex.split(url[len("pipe:"):]), stdout=subprocess.PIPE).stdout
    for scheme, package in FSSPEC_PACKAGES.items():
        if url.startswith(scheme):
            try:
                __import__(package)
            except ImportError as err:
                raise OSError(f"{url}: reading {scheme} URLs needs the {package} package (pip install {package})") \
                    from err
    import fsspec

    return fsspec.open(url, "rb").open()
