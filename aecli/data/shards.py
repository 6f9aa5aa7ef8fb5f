"""WebDataset tar shards: finding them (a .tar, a folder of them, a brace pattern) and indexing
their image members from the tar headers alone, so that a member is later read by its offset
(pread) without tarfile, and nothing is held but the index."""

from __future__ import annotations

import os
import re
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from aecli.data.images import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, Failure
from aecli.errors import DataError, printable
from aecli.io.jsonfile import file_kind

SHARD_SUFFIX = ".tar"
MAX_SHARDS = 1_000_000  # names a brace pattern may expand to


def expand_braces(pattern: str) -> list[str]:
    """A brace pattern's names, as a shell (and WebDataset) expands them: `{000..099}` counts
    with the first number's zero padding, `{a,b}` lists; several braces multiply. A pattern of
    more than MAX_SHARDS names is refused before any is made."""
    count = 1
    for body in re.findall(r"\{([^{}]*)\}", pattern):
        numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        count *= abs(int(numbers[2]) - int(numbers[1])) + 1 if numbers else len(body.split(","))
        if count > MAX_SHARDS:
            raise DataError(
                f"the brace pattern names more than {MAX_SHARDS:,} shards", path=pattern
            )
    return _expand(pattern)


def _expand(pattern: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    head, tail, body = pattern[: match.start()], pattern[match.end() :], match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        parts = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        parts = body.split(",")
    return [name for part in parts for name in _expand(head + part + tail)]


def shard_paths(path: str | Path) -> list[Path] | None:
    """The shards a `--data` value names (one .tar, a brace pattern, or a folder holding .tar
    files), or None when it names no shards; a named shard that is missing is an error."""
    text = str(path)
    if "{" in text:
        paths = [Path(p) for p in expand_braces(text)]
        if not paths or not all(p.name.endswith(SHARD_SUFFIX) for p in paths):
            raise DataError(f"a brace pattern names WebDataset shards ({SHARD_SUFFIX})", path=text)
        missing = [p for p in paths if not p.exists()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DataError(f"shard not found: {missing[0]}{more}", path=text)
        return _regular_shards(paths)
    path = Path(path)
    if path.name.endswith(SHARD_SUFFIX) and path.exists() and not path.is_dir():
        return _regular_shards([path])
    if path.is_dir():
        shards = sorted(p for p in path.iterdir() if p.name.endswith(SHARD_SUFFIX))
        return _regular_shards(shards) or None
    return None


def _regular_shards(paths: list[Path]) -> list[Path]:
    """`paths`, each checked to be a regular file (links followed) without opening it: a FIFO
    would block its reader forever, a device never end."""
    for path in paths:
        try:
            _check_regular(path, os.stat(path).st_mode)
        except OSError as exc:
            raise DataError(f"cannot read: {exc.strerror or exc}", path=path) from None
    return paths


def _check_regular(path: Path, mode: int) -> None:
    """Refuse a shard that is not a regular file, naming what it is."""
    if not stat.S_ISREG(mode):
        raise DataError(
            f"not a regular file ({file_kind(mode)}); a shard is a plain .tar file", path=path
        )


def open_shard(path: Path) -> int:
    """A read-only descriptor of a shard, refused when it is not a regular file: opened
    without blocking, so that a shard swapped for a FIFO since it was listed cannot hang."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _check_regular(path, os.fstat(fd).st_mode)
    except DataError:
        os.close(fd)
        raise
    return fd


@dataclass
class ShardMember:
    shard: int  # index into the list of shards
    offset: int  # of the member's data in the tar file
    size: int
    name: str  # the member's name in the tar


def index_shard(path: Path, number: int) -> tuple[dict[str, ShardMember], list[Failure]]:
    """The image member of each WebDataset sample in one shard (key: the member's name up to
    the first dot of its file name, as WebDataset groups them), from the tar's headers alone;
    and what is left out: an image member larger than MAX_IMAGE_BYTES (never read), the rest
    of a shard cut short (its members before the cut are kept)."""
    try:
        fd = open_shard(path)
    except OSError as exc:
        raise DataError(f"not a readable tar shard: {exc.strerror or exc}", path=path) from None
    try:
        magic = os.pread(fd, 6, 0)
        if magic.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
            raise DataError("compressed shards cannot be read by offset; use plain .tar", path=path)
        found = _scan_ustar(fd, path, number)
        return found if found is not None else _scan_tarfile(fd, path, number)
    except OSError as exc:
        raise DataError(f"not a readable tar shard: {exc.strerror or exc}", path=path) from None
    finally:
        os.close(fd)


def _add_member(
    samples: dict[str, ShardMember],
    failures: list[Failure],
    path: Path,
    name: str,
    number: int,
    offset: int,
    size: int,
) -> None:
    """Keep a member that is a sample's image (the first image member of its key); one too
    large to be an image is named in `failures` instead, by the size its header gives."""
    directory, _, base = name.rpartition("/")
    stem, dot, _ = base.partition(".")
    suffix = "." + base.rsplit(".", 1)[-1].lower() if dot else ""
    if suffix not in IMAGE_SUFFIXES or not stem:
        return
    if size > MAX_IMAGE_BYTES:
        failures.append(
            Failure(
                f"{path}/{printable(name)}",
                f"member of {size:,} bytes, larger than any image aecli reads "
                f"({MAX_IMAGE_BYTES:,} bytes at most); never read",
            )
        )
        return
    key = f"{directory}/{stem}" if directory else stem
    samples.setdefault(key, ShardMember(number, offset, size, name))


def _scan_ustar(
    fd: int, path: Path, number: int
) -> tuple[dict[str, ShardMember], list[Failure]] | None:
    """index_shard for the ustar headers WebDataset writers produce (with pax records or GNU
    long names for the next member), read directly: three times as fast as tarfile here;
    None where a header needs tarfile (other extensions, numbers in base 256, a bad checksum:
    tarfile then says what is wrong)."""
    samples: dict[str, ShardMember] = {}
    failures: list[Failure] = []
    end, offset = os.fstat(fd).st_size, 0
    pending: dict[bytes, bytes] = {}  # pax records (or a GNU long name) for the next member
    while offset + 512 <= end:
        header = os.pread(fd, 512, offset)
        if header == bytes(512):  # the end-of-archive blocks
            return samples, failures
        kind = header[156:157]
        checksum = header[148:156].split(b"\0", 1)[0].strip()
        if (
            kind not in (b"0", b"\0", b"7", b"1", b"2", b"5", b"x", b"g", b"L")
            or header[124] & 0x80
            or not checksum.isdigit()
            or int(checksum, 8) != sum(header[:148]) + 256 + sum(header[156:])
        ):
            return None
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        data = offset + 512
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345]:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if data + size > end:
            cut = printable(pending.get(b"path", name).decode("utf-8", "surrogateescape"))
            failures.append(Failure(str(path), f"cut short in {cut}; the rest is lost"))
            return samples, failures
        offset = data + -(-size // 512) * 512
        if kind in (b"x", b"L"):
            if size > 1 << 20:  # a header that large is no WebDataset's
                return None
            body = os.pread(fd, size, data)
            pending = _pax_records(body) if kind == b"x" else {b"path": body.rstrip(b"\0")}
            if pending is None:
                return None
            continue
        if kind == b"g":
            continue
        name = pending.get(b"path", name)
        if b"size" in pending:
            return None  # a size past ustar's: tarfile knows where the data ends
        pending = {}
        if kind in (b"0", b"\0", b"7"):
            member = name.decode("utf-8", "surrogateescape")
            _add_member(samples, failures, path, member, number, data, size)
    if offset < end:
        failures.append(Failure(str(path), "cut short; the rest is lost"))
    return samples, failures


def _pax_records(body: bytes) -> dict[bytes, bytes] | None:
    """A pax extended header's records ("LENGTH KEY=VALUE\\n" each), or None if malformed."""
    records, at = {}, 0
    while at < len(body) and body[at : at + 1] != b"\0":
        space = body.find(b" ", at)
        if space < 0 or not body[at:space].isdigit():
            return None
        length = int(body[at:space])
        record = body[space + 1 : at + length]
        if length <= space - at or not record.endswith(b"\n") or b"=" not in record:
            return None
        key, _, value = record[:-1].partition(b"=")
        records[key] = value
        at += length
    return records


def _scan_tarfile(fd: int, path: Path, number: int) -> tuple[dict[str, ShardMember], list[Failure]]:
    samples: dict[str, ShardMember] = {}
    failures: list[Failure] = []
    size = os.fstat(fd).st_size
    try:
        with (
            os.fdopen(fd, "rb", closefd=False) as handle,
            tarfile.open(fileobj=handle, mode="r:") as tar,
        ):
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError) as exc:
                    failures.append(
                        Failure(
                            str(path),
                            f"cut short after {len(samples)} samples ({exc}); the rest is lost",
                        )
                    )
                    return samples, failures
                if member is None:
                    return samples, failures
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    cut = f"cut short in {printable(member.name)}; the rest is lost"
                    failures.append(Failure(str(path), cut))
                    return samples, failures
                _add_member(
                    samples, failures, path, member.name, number, member.offset_data, member.size
                )
    except tarfile.CompressionError:
        raise DataError(
            "compressed shards cannot be read by offset; use plain .tar", path=path
        ) from None
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"not a readable tar shard: {exc}", path=path) from None


def read_member(fd: int, member: ShardMember) -> bytes:
    """A member's bytes, shorter only where the file ends first: one pread returns at most
    about 2 GiB on Linux, and may return less than asked for at any size."""
    parts, at, left = [], member.offset, member.size
    while left:
        part = os.pread(fd, left, at)
        if not part:
            break
        parts.append(part)
        at, left = at + len(part), left - len(part)
    return b"".join(parts)
