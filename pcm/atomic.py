"""Crash-safe writes: a file or a folder is either the old one or the complete new one, never half of either.

Every byte is fsynced before the rename that publishes it, and the parent folder after it, so a kill (or a power
loss) at any point leaves the previous version readable. Used by checkpoints, the LoRA export, prepared shards'
index.json and the run manifest. Standard library only: every layer may use it.
"""

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flushes a file's or a folder's entry to disk (folders: the names in it, so a rename survives)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Every file and folder under folder, deepest first, then folder itself."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """path holds data, written through a fsynced sibling temp file and one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_path(path.parent)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def publish_dir(tmp: Path, final: Path) -> Path:
    """Moves the complete folder tmp to final. An existing final is renamed aside first and deleted only after
    the new one is in place, so at every instant one complete version exists under final or beside it."""
    fsync_tree(tmp)
    old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A fresh temp folder beside final to write into; published as final when the block ends without error,
    removed when it raises."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp-{final.name}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)
