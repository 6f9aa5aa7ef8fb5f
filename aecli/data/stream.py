"""Streamed data sets: image folders and WebDataset tar shards read from disk every epoch.

A streamed source is a list of samples (a file, or a member of a shard found by its offset in
the tar's headers), never their pixels: memory does not grow with the number of images.
DataLoader workers decode each batch with the one safe image reader, resize and crop each
sample (seeded by run seed, epoch and sample, so a run repeats), and hand uint8 batches to the
training loop, which treats them as it treats batches of the in-memory path.

Each epoch's order follows from the seed and the epoch: for shards the shard order is shuffled,
then the samples within each shard. Every rank takes its share of that order as the in-memory
path does, the share is cut into batches, and worker w of W decodes batches w, w + W, ...; the
DataLoader hands them back in order, so the batches do not depend on the number of workers, and
a resumed run starts at the first batch the checkpoint had not trained on, without reading the
ones before it.

Validation images are chosen by a hash of each sample's key (so the choice does not move as a
data set grows), at most `data.val_max` of them, decoded once and kept in memory.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import stat
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from aecli.config import DataConfig
from aecli.data.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_BYTES,
    Failure,
    ImageReadError,
    decode_all,
    fit_picture,
    read_image,
    read_image_bytes,
)
from aecli.errors import DataError, printable
from aecli.io.jsonfile import file_kind

SHARD_SUFFIX = ".tar"
OPEN_SHARDS = 64  # shard files a process keeps open at most
MAX_SHARDS = 1_000_000  # names a brace pattern may expand to


# -- finding the samples ------------------------------------------------------------------------


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


def key_hash(key: str) -> float:
    """A sample key's place in [0, 1): the same on every machine and in every run."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


# -- decoding one sample ------------------------------------------------------------------------


def sample_random(seed: int, epoch: int, sample: int) -> random.Random:
    """The random draws of one sample in one epoch of a run: the same on every machine, in every
    process and whatever the batch (Python's string seeds go through SHA-512)."""
    return random.Random(f"{seed}:{epoch}:{sample}")


def fit_sample(image: Image.Image, config: DataConfig, rng: random.Random | None) -> Image.Image:
    """One decoded picture to data.image_size: the shorter side to data.resize (a size drawn
    from its range, the low end without `rng`), then a crop at a random place (data.crop:
    random, with `rng`) or the centre. Without data.resize as the in-memory path fits it
    (data.fit), the crop's place drawn where data.crop is random."""
    h, w = config.size
    sides = config.resize_range
    if sides is None and (config.crop == "center" or rng is None or config.fit == "stretch"):
        return fit_picture(image, config.size, config.fit)
    if sides is None:
        scale = max(h / image.height, w / image.width)
    else:
        side = sides[0] if rng is None else rng.randint(sides[0], sides[1])
        scale = side / min(image.height, image.width)
    size = (max(w, round(image.width * scale)), max(h, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    if config.crop == "random" and rng is not None:
        left = rng.randint(0, image.width - w)
        top = rng.randint(0, image.height - h)
    else:
        left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h))


# -- the data set -------------------------------------------------------------------------------


@dataclass
class StreamedData:
    """A data set read from disk: its samples (files, or members of shards), which of them
    train, the validation images in memory, labels (folders with class subfolders)."""

    keys: list[str]  # one per sample: the relative path, or SHARD/KEY
    files: list[Path] | None  # a folder's files
    shards: list[Path] | None  # or the shards and each sample's member in them
    members: list[ShardMember] | None
    labels: torch.Tensor | None
    class_names: list[str] | None
    source: dict
    config: DataConfig
    train: np.ndarray  # sample numbers that train, in sample order
    validation: object = None  # ImageData, in memory
    skipped: list[Failure] = field(default_factory=list)
    held_out: list[str] = field(default_factory=list)  # keys of the validation samples

    def __len__(self) -> int:
        return len(self.train)

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The training samples in this epoch's order: a permutation from (seed, epoch); for
        shards the shard order, then the samples within each shard."""
        rng = np.random.default_rng([seed, epoch, 0x5EED])
        if not self.sharded:
            return self.train[rng.permutation(len(self.train))]
        shard_of = np.fromiter(
            (self.members[i].shard for i in self.train), np.int64, len(self.train)
        )
        order = []
        for shard in rng.permutation(len(self.shards)):
            mine = self.train[shard_of == shard]
            order.append(mine[rng.permutation(len(mine))])
        return np.concatenate(order) if order else self.train[:0]

    def read(self, sample: int, at_least: int | None = None, fit=None) -> np.ndarray:
        """Decode one sample to uint8 (H, W, C), `fit` (read_image's) applied; raises
        ImageReadError."""
        channels = self.config.channels
        if not self.sharded:
            return read_image(self.files[sample], channels, at_least=at_least, fit=fit)
        member = self.members[sample]
        name = f"{self.shards[member.shard]}/{printable(member.name)}"
        try:
            data = _read_member(self._shard_file(member.shard), member)
        except (OSError, DataError) as exc:
            reason = exc.message if isinstance(exc, DataError) else exc.strerror or exc
            raise ImageReadError(name, f"cannot read: {reason}") from None
        if len(data) != member.size:  # the file was cut since its headers were read
            raise ImageReadError(name, "shard ends inside this member")
        return read_image_bytes(data, name, channels, at_least=at_least, fit=fit)

    def _shard_file(self, shard: int) -> int:
        """An open descriptor of a shard, this process's own: a worker forked from a process
        that had shards open opens them again (and pread never moves a shared offset)."""
        pid, files = self.__dict__.get("_files", (None, {}))
        if pid != os.getpid():
            pid, files = os.getpid(), {}
            self.__dict__["_files"] = (pid, files)
        if shard not in files:
            if len(files) >= OPEN_SHARDS:  # the longest open one goes (dicts keep their order)
                os.close(files.pop(next(iter(files))))
            files[shard] = open_shard(self.shards[shard])
        return files[shard]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_files", None)  # open files stay in their process
        return state

    def at_least(self) -> int:
        """The smallest shorter side a decoded image may have (JPEGs decode at a reduced scale
        down to it): the high end of data.resize (a draw may ask for it), else the crop's
        longer side."""
        sides = self.config.resize_range
        return sides[1] if sides is not None else max(self.config.size)

    def sample(self, sample: int, rng: random.Random | None) -> np.ndarray | Failure:
        """One sample decoded and fitted (uint8 (H, W, C)), or why it could not be."""
        try:
            fit = lambda image: fit_sample(image, self.config, rng)  # noqa: E731
            return self.read(sample, self.at_least(), fit)
        except ImageReadError as exc:
            return Failure(exc.path, exc.reason)


def _read_member(fd: int, member: ShardMember) -> bytes:
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


def default_workers() -> int:
    """One decoding process per core but one (for the training loop), at least one."""
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def open_stream(
    path: str | Path,
    config: DataConfig,
    shards: list[Path] | None,
    listing=None,
) -> StreamedData:
    """A folder (its `listing` where sources.list_folder gave it already) or shards as a
    StreamedData, listed (shards: their headers read), without its validation set (see
    choose_validation)."""
    skipped: list[Failure] = []
    if shards is not None:
        members: list[ShardMember] = []
        keys: list[str] = []
        for number, shard in enumerate(shards):
            found, failures = index_shard(shard, number)
            skipped += failures
            keys += [f"{shard.name}/{key}" for key in found]
            members += found.values()
        if not keys:
            raise DataError(f"no images in {len(shards)} shard(s)", path=str(path))
        source = {
            "kind": "shards",
            "path": str(path),
            "shards": len(shards),
            "count": len(keys),
            "streamed": True,
        }
        data = StreamedData(
            keys,
            None,
            shards,
            members,
            None,
            None,
            source,
            config,
            np.arange(len(keys)),
            skipped=skipped,
        )
        return data
    from aecli.data.sources import list_folder

    listing = listing if listing is not None else list_folder(Path(path))
    root, files, labels = listing.root, listing.files, listing.labels
    source = {"kind": "folder", "path": str(root), "count": len(files), "streamed": True}
    return StreamedData(
        [file.relative_to(root).as_posix() for file in files],
        files,
        None,
        None,
        None if labels is None else torch.tensor(labels, dtype=torch.int64),
        listing.class_names,
        source,
        config,
        np.arange(len(files)),
        skipped=list(listing.failures),
    )


def choose_validation(data: StreamedData, fraction: float, validation=None) -> StreamedData:
    """Hold out the validation images: the samples whose key hashes below `fraction`, at most
    data.val_max of them (the lowest hashes), decoded once (centre crops) and kept in memory;
    or `validation` (ImageData from --val-data), holding out nothing."""
    from aecli.data.sources import ImageData

    if validation is not None:
        data.validation = validation
        return data
    hashes = np.array([key_hash(k) for k in data.keys])
    chosen = np.flatnonzero(hashes < fraction)
    chosen = chosen[np.argsort(hashes[chosen], kind="stable")][: data.config.val_max]
    if not len(chosen):  # a small set: at least one image
        chosen = np.argsort(hashes, kind="stable")[:1]
    if len(chosen) >= len(data.keys):
        raise DataError(
            f"need at least 2 images for a train / validation split, got {len(data.keys)}",
            path=data.source["path"],
        )
    decoded = decode_all(lambda i: data.sample(int(i), None), sorted(chosen))
    kept = [i for i, d in zip(sorted(chosen), decoded, strict=True) if not isinstance(d, Failure)]
    data.skipped += [d for d in decoded if isinstance(d, Failure)]
    if not kept:
        raise DataError("none of the validation images could be read", path=data.source["path"])
    images = torch.from_numpy(np.stack([d for d in decoded if not isinstance(d, Failure)]))
    labels = None if data.labels is None else data.labels[torch.tensor(kept)]
    data.validation = ImageData(
        images.permute(0, 3, 1, 2).contiguous(), labels, data.class_names, data.source
    )
    held = np.zeros(len(data.keys), bool)
    held[chosen] = True  # an unreadable validation image does not train either
    data.held_out = [data.keys[i] for i in sorted(chosen)]
    data.train = np.flatnonzero(~held)
    return data


# -- batches for the training loop --------------------------------------------------------------


class EpochBatches(IterableDataset):
    """One rank's batches of one epoch (lists of sample numbers), from batch `start` on: worker
    w of W decodes batches start + w, start + w + W, ... and the DataLoader returns them in
    order. Each item: (batch number, uint8 (B, C, H, W) images, the sample numbers of those
    images, the failures of the others)."""

    def __init__(
        self,
        data: StreamedData,
        batches: list[np.ndarray],
        start: int,
        seed: int | None,
        epoch: int,
    ):
        self.data, self.batches, self.start = data, batches, start
        self.seed, self.epoch = seed, epoch  # seed None: no random crops (validation, stats)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for number in range(self.start + worker, len(self.batches), workers):
            images, kept, failures = [], [], []
            for sample in self.batches[number]:
                rng = None
                if self.seed is not None:
                    rng = sample_random(self.seed, self.epoch, int(sample))
                decoded = self.data.sample(int(sample), rng)
                if isinstance(decoded, Failure):
                    failures.append(decoded)
                else:
                    images.append(decoded)
                    kept.append(int(sample))
            c = self.data.config.channels
            h, w = self.data.config.size
            stacked = (
                torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
                if images
                else torch.empty((0, c, h, w), dtype=torch.uint8)
            )
            yield number, stacked, torch.tensor(kept, dtype=torch.int64), failures


def batch_loader(
    data: StreamedData,
    batches: list[np.ndarray],
    start: int,
    seed: int | None,
    epoch: int,
    *,
    pin_memory: bool,
):
    """A DataLoader over EpochBatches with data.workers processes (none for a batch or
    less), pinning where the device wants it."""
    workers = data.config.workers
    workers = default_workers() if workers is None else workers
    workers = min(workers, max(0, len(batches) - start))
    return torch.utils.data.DataLoader(
        EpochBatches(data, batches, start, seed, epoch),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        pin_memory=pin_memory,
        worker_init_fn=_ignore_ctrl_c if workers else None,
    )


def _ignore_ctrl_c(_: int) -> None:
    """A terminal's Ctrl-C reaches the workers too: they go on decoding while the training
    loop finishes its step and saves, and end when the loader is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
