"""Webdataset tar shards: reading samples (grouped by key) tolerantly, and writing them deterministically.

A sample is the set of files sharing a key: 'dir/000123.jpg', 'dir/000123.txt', 'dir/000123.json' form key
'dir/000123' with extensions jpg, txt, json (the key ends at the first dot of the file name).
"""

import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")  # no dots, no '..', not absolute


@dataclass
class RawSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    truncated: bool = False  # the shard ended inside this sample


def split_name(name: str) -> tuple[str, str]:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png')."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def iter_tar(stream: BinaryIO) -> Iterator[RawSample]:
    """Samples of a tar stream in order; a truncated or corrupt tar ends the iteration after a final sample
    marked truncated (the bytes read so far are kept). Raises tarfile.ReadError only if no header is readable."""
    current: RawSample | None = None
    archive = tarfile.open(fileobj=stream, mode="r|*")
    try:
        for member in archive:
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if current is not None and key != current.key:
                yield current
                current = None
            current = current or RawSample(key)
            data = archive.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError(f"member {member.name} cut short")
            current.files[ext] = data
    except (tarfile.ReadError, EOFError, OSError, tarfile.StreamError):
        if current is None:
            current = RawSample("")
        current.truncated = True
    if current is not None:
        yield current


def iter_folder(folder: Path) -> Iterator[RawSample]:
    """Samples of a plain folder of 'name.jpg' + 'name.txt' (+ 'name.json') files, in sorted name order."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    current: RawSample | None = None
    for path in files:
        key, ext = split_name(path.relative_to(folder).as_posix())
        if current is not None and key != current.key:
            yield current
            current = None
        current = current or RawSample(key)
        current.files[ext] = path.read_bytes()
    if current is not None:
        yield current


BLOCK, RECORD = 512, 10240  # tar block and record sizes: archives end with two zero blocks, padded to a record


def encode_sample(key: str, files: dict[str, bytes]) -> bytes:
    """The tar members of one sample ('key.ext', sorted by extension) with fixed metadata: identical bytes on
    every run. Writing members ourselves (not tarfile.addfile) lets prepare move whole samples as byte blobs."""
    blob = bytearray()
    for ext in sorted(files):
        data = files[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        blob += info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
        blob += data
        blob += bytes(-len(data) % BLOCK)
    return bytes(blob)


class ShardWriter:
    """Writes samples into numbered tar shards of a fixed sample count: shard-00000.tar, shard-00001.tar, ..."""

    def __init__(self, folder: Path, shard_size: int, prefix: str = "shard"):
        self.folder, self.shard_size, self.prefix = folder, shard_size, prefix
        folder.mkdir(parents=True, exist_ok=True)
        self.counts: list[int] = []
        self._file: BinaryIO | None = None
        self._size = 0

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """One sample; files are written in sorted extension order."""
        self.write_encoded(encode_sample(key, files))

    def write_encoded(self, blob: bytes) -> None:
        """One sample already encoded by encode_sample."""
        if self._file is None or self.counts[-1] == self.shard_size:
            self._open_next()
        self._file.write(blob)
        self._size += len(blob)
        self.counts[-1] += 1

    def _open_next(self) -> None:
        self.close()
        self._file = open(self.folder / f"{self.prefix}-{len(self.counts):05d}.tar", "wb")
        self._size = 0
        self.counts.append(0)

    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}-{i:05d}.tar" for i in range(len(self.counts))]

    def close(self) -> None:
        if self._file is not None:
            end = self._size + 2 * BLOCK
            self._file.write(bytes(2 * BLOCK + (-end % RECORD)))
            self._file.close()
            self._file = None
