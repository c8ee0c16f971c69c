"""Content digests that key caches: what a cached result depends on, hashed (sha256, 16 hex digits)."""

import hashlib
import json
from pathlib import Path


def model_files(reference: str, subfolders: tuple[str, ...] = ()) -> list[Path]:
    """The files under a local model directory (only the given subfolders, when listed); a hub id or an empty
    reference (an unset config key, which Path would read as the working directory) has none."""
    root = Path(reference)
    if not reference or not root.is_dir():
        return []
    folders = [root / s for s in subfolders] if subfolders else [root]
    return sorted(p for folder in folders if folder.is_dir() for p in folder.rglob("*") if p.is_file())


def digest(values, files: list[Path] = ()) -> str:
    """16 hex digits of sha256 over JSON-encoded values and then each file's name and bytes."""
    h = hashlib.sha256(json.dumps(values, sort_keys=True).encode())
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def prepared_digest(folder: str | Path) -> str | None:
    """16 hex digits identifying the data of a prepared-shards folder, None without its index.json: the shard list
    with the sha256 of each shard that `pcm prepare` records (an index written before it did: names, sample counts
    and file sizes), so identical data gives the same digest and any other data another."""
    index = Path(folder) / "index.json"
    if not index.is_file():
        return None
    shards = json.loads(index.read_text())["shards"]
    return digest([[s["name"], s["samples"], s.get("sha256") or _size(Path(folder) / s["name"])] for s in shards])


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else -1
