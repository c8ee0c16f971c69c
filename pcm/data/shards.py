"""Webdataset tar shards: reading samples (grouped by key) tolerantly, and writing them deterministically.

A sample is the set of files sharing a key: 'dir/000123.jpg', 'dir/000123.txt', 'dir/000123.json' form key
'dir/000123' with extensions jpg, txt, json (the key ends at the first dot of the file name).

Input shards are untrusted: a 200 KB .tar.gz can inflate to a 200 MiB caption. With Limits, a member's size is taken
from its tar header (a folder's file: from stat) and checked before a byte of it is read; a member over its limit
is skipped unread (the stream inflates past it in small blocks) and noted in RawSample.oversized. Compressed shards
(gz, bz2, xz) are read as streams, never inflated whole, and header kinds that tarfile would read whole whatever
their size (pax records, GNU long names) or expand into lists (sparse maps) end the shard as corrupt.
"""

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSION = "txt"
TEXT_EXTENSIONS = ("txt", "json")  # held to Limits.text: captions and metadata are far smaller than media
KEY_PATTERN = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")  # no dots, no '..', not absolute
MAX_HEADER_BYTES = 1 << 16  # pax records and GNU long names: a few hundred bytes in real shards


@dataclass(frozen=True)
class Limits:
    """The most bytes read into memory per member, decided from its declared size before reading it."""

    media: int  # any member that is not text (images, videos, other files)
    text: int  # captions and json
    keep: frozenset[str] | None = None  # extensions read; others are only noted (RawSample.unread); None = all

    def of(self, ext: str) -> int:
        return self.text if ext in TEXT_EXTENSIONS else self.media

    @property
    def sample(self) -> int:
        """A sample holds at most one medium and its texts: more bytes than that is a sample built to exhaust
        memory through many extensions under one key."""
        return self.media + 2 * self.text


@dataclass
class RawSample:
    key: str
    files: dict[str, bytes] = field(default_factory=dict)  # extension -> bytes
    truncated: bool = False  # the shard ended inside this sample
    error: str = ""  # when truncated: why the shard ended
    oversized: dict[str, str] = field(default_factory=dict)  # extension -> why it was left unread
    unread: set[str] = field(default_factory=set)  # extensions present but not in Limits.keep (bytes not read)


def split_name(name: str) -> tuple[str, str]:
    """'dir/000123.seg.png' -> ('dir/000123', 'seg.png')."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _admit(sample: RawSample, name: str, ext: str, size: int, limits: Limits | None) -> bool:
    """Whether to read a member of `size` declared bytes into sample (else it is noted as unread or oversized)."""
    if limits is None:
        return True
    if limits.keep is not None and ext not in limits.keep:
        sample.unread.add(ext)
        return False
    held = sum(len(data) for data in sample.files.values())
    if size > limits.of(ext):
        sample.oversized[ext] = f"{name}: {size} bytes > limit {limits.of(ext)}"
        return False
    if held + size > limits.sample:
        sample.oversized[ext] = f"{name}: {size} bytes on top of {held} in the sample > limit {limits.sample}"
        return False
    return True


class _GuardedInfo(tarfile.TarInfo):
    """tarfile's header parsing with the memory holes closed: pax records and GNU long names are read whole into
    memory at whatever size the header claims, and sparse maps grow a list per block; they are refused (the shard
    ends as corrupt, the samples before it are kept). A stream that stops inside or right before a header (no
    end-of-archive blocks) is flagged cut_short: tarfile would end the iteration there as if the tar were whole."""

    def _proc_member(self, archive):
        if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                         tarfile.GNUTYPE_LONGLINK) and self.size > MAX_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(f"an extended header of {self.size} bytes (limit {MAX_HEADER_BYTES})")
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise tarfile.SubsequentHeaderError(f"sparse member {self.name!r}: not read")
        return super()._proc_member(archive)

    def _proc_gnusparse_10(self, next, pax_headers, archive):  # noqa: A002 (tarfile's own signature)
        raise tarfile.SubsequentHeaderError(f"sparse member {next.name!r}: not read")

    @classmethod
    def fromtarfile(cls, archive):
        try:
            return super().fromtarfile(archive)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError):
            archive.cut_short = True
            raise


def iter_tar(stream: BinaryIO, limits: Limits | None = None) -> Iterator[RawSample]:
    """Samples of a tar stream in order; a truncated or corrupt tar ends the iteration after a final sample
    marked truncated (the bytes read so far are kept). Raises tarfile.ReadError only if no header is readable.
    limits: members over them are not read (module docstring); None reads every member (trusted, prepared shards)."""
    current: RawSample | None = None
    archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_GuardedInfo)
    try:
        for member in archive:
            archive.members = []  # stream mode keeps every header it parsed: memory would grow with member count
            if not member.isfile():
                continue
            key, ext = split_name(member.name)
            if current is not None and key != current.key:
                yield current
                current = None
            current = current or RawSample(key)
            if not _admit(current, member.name, ext, member.size, limits):
                continue  # the next header read skips the data in small blocks
            data = archive.extractfile(member).read()
            if len(data) != member.size:
                raise EOFError(f"member {member.name} cut short")
            current.files[ext] = data
        if getattr(archive, "cut_short", False):
            raise EOFError("the tar stops without its end-of-archive blocks")
    except (tarfile.ReadError, EOFError, OSError, tarfile.StreamError) as err:
        if current is None:
            current = RawSample("")
        current.truncated, current.error = True, f"{type(err).__name__}: {err}"
    if current is not None:
        yield current


def iter_folder(folder: Path, limits: Limits | None = None) -> Iterator[RawSample]:
    """Samples of a plain folder of 'name.jpg' + 'name.txt' (+ 'name.json') files, in sorted name order; limits
    as in iter_tar, on each file's size before it is read."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    current: RawSample | None = None
    for path in files:
        name = path.relative_to(folder).as_posix()
        key, ext = split_name(name)
        if current is not None and key != current.key:
            yield current
            current = None
        current = current or RawSample(key)
        if _admit(current, name, ext, path.stat().st_size, limits):
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
    """Writes samples into numbered tar shards of a fixed sample count: shard-00000.tar, shard-00001.tar, ...

    Each shard is fsynced when closed (a shard that index.json names survives a crash) and its sha256 kept in
    digests: the prepared data's identity, which keys caches such as precomputed latents."""

    def __init__(self, folder: Path, shard_size: int, prefix: str = "shard"):
        self.folder, self.shard_size, self.prefix = folder, shard_size, prefix
        folder.mkdir(parents=True, exist_ok=True)
        self.counts: list[int] = []
        self.digests: list[str] = []  # sha256 hex of each closed shard's bytes
        self._file: BinaryIO | None = None
        self._size = 0
        self._hash = hashlib.sha256()

    def write(self, key: str, files: dict[str, bytes]) -> None:
        """One sample; files are written in sorted extension order."""
        self.write_encoded(encode_sample(key, files))

    def write_encoded(self, blob: bytes) -> None:
        """One sample already encoded by encode_sample."""
        if self._file is None or self.counts[-1] == self.shard_size:
            self._open_next()
        self._write(blob)
        self.counts[-1] += 1

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._hash.update(data)
        self._size += len(data)

    def _open_next(self) -> None:
        self.close()
        self._file = open(self.folder / f"{self.prefix}-{len(self.counts):05d}.tar", "wb")
        self._size, self._hash = 0, hashlib.sha256()
        self.counts.append(0)

    @property
    def names(self) -> list[str]:
        return [f"{self.prefix}-{i:05d}.tar" for i in range(len(self.counts))]

    def close(self) -> None:
        """Ends the open shard; a full disk surfaces here as OSError at the latest (the flush), never silently."""
        if self._file is None:
            return
        file = self._file
        try:
            end = self._size + 2 * BLOCK
            self._write(bytes(2 * BLOCK + (-end % RECORD)))
            file.flush()
            os.fsync(file.fileno())
        finally:
            self._file = None
            file.close()
        self.digests.append(self._hash.hexdigest())
