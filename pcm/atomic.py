"""Crash-safe writes: a file or a folder is either the old one or the complete new one, never half of either.

Every byte is fsynced before the rename that publishes it, and the parent folder after it, so a kill (or a power
loss) at any point leaves the previous version readable. Used by checkpoints, the LoRA export, prepared shards'
index.json and the run manifest. Standard library only: every layer may use it.
"""

import os
import re
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


def _beside(final: Path, kind: str) -> Path:
    """A hidden sibling of final: .tmp- (being written), .old- (the previous version, moved aside), .del- (being
    deleted). The 8 hex digits keep two attempts apart."""
    return final.with_name(f".{kind}-{final.name}-{uuid.uuid4().hex[:8]}")


def remove_dir(path: Path, final: Path | None = None) -> None:
    """Deletes a folder by renaming it to a .del- name first: a kill halfway through the deletion then leaves a
    .del- leftover, never a half folder under a name that means something (a checkpoint, an .old- version).
    final: the folder that path is a leftover of (the .del- name is made from its name, so recover_dir finds it)."""
    trash = _beside(final or path, "del")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> Path:
    """Moves the complete folder tmp to final. An existing final is renamed aside first and deleted only after
    the new one is in place, so at every instant one complete version exists under final or beside it."""
    fsync_tree(tmp)
    old = _beside(final, "old")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(final.parent)
    if old.exists():
        remove_dir(old, final)
    return final


def leftovers(final: Path) -> dict[str, list[Path]]:
    """final's hidden siblings by kind ('tmp', 'old', 'del'), each list sorted by name."""
    pattern = re.compile(rf"^\.(tmp|old|del)-{re.escape(final.name)}-[0-9a-f]{{8}}$")
    found: dict[str, list[Path]] = {"tmp": [], "old": [], "del": []}
    if final.parent.is_dir():
        for path in sorted(final.parent.iterdir()):
            match = pattern.match(path.name)
            if match:
                found[match.group(1)].append(path)
    return found


def recover_dir(final: Path) -> None:
    """Repairs what a kill inside staged_dir / publish_dir left: when final is missing but its previous version
    was moved aside (the kill fell between publish_dir's two renames), that version goes back to final; every
    other leftover sibling is deleted. For the folder's one writer only, before it stages a new version."""
    found = leftovers(final)
    if not final.exists() and found["old"]:
        # .old- folders are only ever made by renaming a complete final and only removed via .del-, so one is whole
        os.replace(found["old"].pop(), final)
        fsync_path(final.parent)
    for path in found["tmp"] + found["old"]:
        remove_dir(path, final)
    for path in found["del"]:
        shutil.rmtree(path, ignore_errors=True)


@contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """A fresh temp folder beside final to write into; published as final when the block ends without error,
    removed when it raises. One writer per final at a time: it first clears what a killed writer left."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)  # a killed earlier attempt's leftovers would otherwise pile up beside final
    tmp = _beside(final, "tmp")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, final)
