"""Finding shards and reading/writing webdataset .tar files.

Reading is our own small stream reader instead of webdataset's `tarfile_to_samples` so that a
truncated tar drops exactly the sample it cut in half and reports the shard, rather than
passing a half sample downstream.
"""
from __future__ import annotations

import glob
import io
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from imagen_ds.errors import DataError


FIXED_MTIME = 1_700_000_000  # same inputs -> byte-identical shards


class TruncatedTar(Exception):
    """A shard ended inside a member (or its tar structure is broken)."""


def expand_shards(shards: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """A directory, glob, brace pattern ("data/{000..009}.tar") or list of .tar paths -> sorted paths."""
    if isinstance(shards, (str, os.PathLike)):
        spec = str(shards)
        if os.path.isdir(spec):
            found = sorted(glob.glob(os.path.join(spec, "*.tar")))
            where = f"directory {spec}"
        elif "{" in spec:
            found = [u for u in expand_urls(spec) if os.path.isfile(u) or "://" in u or u.startswith("pipe:")]
            where = f"pattern {spec}"
        elif any(c in spec for c in "*?["):
            found = sorted(glob.glob(spec))
            where = f"glob {spec}"
        else:
            if not os.path.isfile(spec):
                raise DataError(f"{spec}: no such shard file or directory")
            found, where = [spec], spec
    else:
        found = []
        for s in shards:
            found.extend(expand_shards(s))
        where = "the shard list"
    found = [f for f in found if not f.endswith(".tmp")]
    if not found:
        raise DataError(f"no .tar shards found in {where}")
    return found


def iter_tar_samples(url: str) -> Iterator[dict]:
    """Yield {"__key__", "__url__", ext: bytes, ...} samples in tar order.

    Raises TruncatedTar after the last complete sample when the tar is cut short or broken;
    the partial sample at the cut is not yielded.
    """
    current: dict | None = None
    try:
        with open(url, "rb") as f:
            stream = tarfile.open(fileobj=f, mode="r|*")
            for info in stream:
                if not info.isreg():
                    continue
                key, ext = base_plus_ext(info.name)
                if key is None or os.path.basename(info.name).startswith("__"):
                    continue
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current  # complete: the next key has started
                    current = {"__key__": key, "__url__": url}
                data = stream.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                current[ext.lower()] = data
                stream.members = []  # stream mode keeps every TarInfo otherwise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise TruncatedTar(f"{url}: {type(e).__name__}: {e}") from None
    if current is not None:
        yield current


def write_tar(path: str | os.PathLike, samples: Iterable[dict]) -> int:
    """Write samples ({"__key__", ext: bytes}) to PATH atomically (PATH.tmp, then rename).

    Returns the number of samples written. A crash leaves only the .tmp file, which readers
    and resuming jobs ignore.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                key = sample["__key__"]
                for ext, data in sample.items():
                    if ext.startswith("__"):
                        continue
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mtime, info.mode = len(data), FIXED_MTIME, 0o444
                    tar.addfile(info, io.BytesIO(data))
                n += 1
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return n
