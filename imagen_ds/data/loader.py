"""The training loader: a webdataset DataPipeline driven by a torch DataLoader.

Stages, each running inside a DataLoader worker (or the main process with workers=0):
  shard urls  -> ResampledShards (endless, seeded per rank/worker) or this rank/worker's slice
  tar reading -> raw samples (bytes), a marker for each truncated shard
  shuffle     -> seeded buffer shuffle of raw samples
  batcher     -> checks, filter, decode, crops, low-res, embedding -> batch dicts

Determinism: every random choice is seeded from (seed, epoch, rank, worker, sample index), so
the stream depends only on those and on the number of workers. Exact resume: `skip_batches=N`
makes each worker drop the samples of its share of the first N batches before the transforms
(the DataLoader takes batches round-robin from the workers, so worker roles are rotated by N).
"""
from __future__ import annotations

import io
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from webdataset import DataPipeline
from webdataset.shardlists import ResampledShards
from webdataset.utils import make_seed

from imagen_ds.data.format import decode_embedding, decode_json, image_ext
from imagen_ds.data.shards import TruncatedTar, expand_shards, iter_tar_samples
from imagen_ds.data.transforms import model_views
from imagen_ds.errors import DataError

log = logging.getLogger(__name__)

# Bad-sample reasons ("filtered" is intended, by data.min_side, and not counted as bad).
REASONS = ("filtered", "missing_key", "bad_metadata", "bad_embedding", "nonfinite_embedding",
           "corrupt_image", "truncated_tar")
MIN_SAMPLES_FOR_SKIP_CHECK = 100  # the skip fraction is judged only after this many samples
SHUFFLE_INITIAL = 100             # samples buffered before the first one leaves the shuffle


@dataclass(frozen=True)
class LoaderSpec:
    """Everything a worker needs (picklable; no config objects cross process boundaries)."""

    urls: tuple[str, ...]
    resolution: int
    lowres: Optional[int]
    train_crop: Optional[int]
    crop: str
    min_side: int
    text_dim: int
    max_tokens: int
    precached: bool
    encoder: str
    micro_batch: int
    rank: int
    world_size: int
    seed: int
    epoch: int
    skip_batches: int
    resample: bool
    shuffle_buffer: int
    max_skip_fraction: float
    num_workers: int


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _worker(spec: LoaderSpec) -> tuple[int, int]:
    """(logical worker id, number of workers). Physical worker p plays role (p + N) % W after
    skipping N batches, so the resumed round-robin continues where the first run stopped."""
    info = torch.utils.data.get_worker_info()
    physical, n = (info.id, info.num_workers) if info is not None else (0, 1)
    return (physical + spec.skip_batches) % n, n


# --------------------------------------------------------------------------- stages


class ShardSource(torch.utils.data.IterableDataset):
    """First stage: {"url": path} dicts for this rank and worker."""

    def __init__(self, spec: LoaderSpec):
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[dict]:
        s = self.spec
        w, n = _worker(s)
        if s.resample:
            # every rank/worker draws shards with replacement from the whole list, reproducibly
            source = ResampledShards(list(s.urls), seed=make_seed(s.seed, s.epoch), deterministic=True,
                                     worker_seed=lambda: make_seed(s.rank, w, n), empty_check=False)
            yield from source
        else:
            urls = list(s.urls)
            random.Random(f"shards/{s.seed}/{s.epoch}").shuffle(urls)  # same order on every rank
            for url in urls[s.rank::s.world_size][w::n]:
                yield {"url": url}


def read_tars(src: Iterator[dict]) -> Iterator[dict]:
    """Raw samples of each shard, plus {"__event__": "truncated_tar"} where a shard is cut short."""
    for item in src:
        url = item["url"]
        try:
            yield from iter_tar_samples(url)
        except TruncatedTar as e:
            yield {"__event__": "truncated_tar", "__url__": url, "__detail__": str(e)}


class SeededShuffle:
    """Buffer shuffle seeded per (seed, epoch, rank, worker)."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        s = self.spec
        w, n = _worker(s)
        rng = random.Random(f"shuffle/{s.seed}/{s.epoch}/{s.rank}/{w}/{n}")
        size = max(1, s.shuffle_buffer)
        initial = min(size, SHUFFLE_INITIAL)
        buf: list[dict] = []
        for sample in src:
            buf.append(sample)
            if len(buf) < size:  # fill the buffer at twice the output rate
                nxt = next(src, None)
                if nxt is not None:
                    buf.append(nxt)
            if len(buf) >= initial:
                yield _pick(buf, rng)
        while buf:
            yield _pick(buf, rng)


def _pick(buf: list, rng: random.Random):
    i = rng.randrange(len(buf))
    buf[i], buf[-1] = buf[-1], buf[i]
    return buf.pop()


class Batcher:
    """Checks, filters, decodes and batches samples; counts every skip by reason."""

    def __init__(self, spec: LoaderSpec):
        self.spec = spec

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        s = self.spec
        w, n = _worker(s)
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)  # workers decode with PIL; keep them off the trainer's cores
        skip_samples = (s.skip_batches // n + (1 if w < s.skip_batches % n else 0)) * s.micro_batch
        counts: Counter = Counter()
        bad_by_shard: Counter = Counter()
        seen = kept = index = 0
        batch: list[dict] = []
        encoder = None
        for raw in src:
            url = raw.get("__url__", "?")
            seen += 1
            try:
                if "__event__" in raw:
                    raise _Skip(raw["__event__"], raw.get("__detail__", ""))
                index += 1
                item = check_and_decode(raw, s)
            except _Skip as e:
                counts[e.reason] += 1
                if e.reason != "filtered":
                    bad_by_shard[url] += 1
                    if counts[e.reason] <= 5 or counts[e.reason] % 1000 == 0:
                        log.warning("skipped sample %s in %s: %s %s (%d so far)", raw.get("__key__", "-"), url,
                                    e.reason, e.detail, counts[e.reason])
                error = _too_many_bad(s, seen, kept, counts, bad_by_shard)
                if error:
                    yield {"_error": error}
                    return
                continue
            if skip_samples > 0:  # resuming: this sample belonged to an already-consumed batch
                skip_samples -= 1
                kept += 1
                continue
            rng = random.Random(f"crop/{s.seed}/{s.epoch}/{s.rank}/{w}/{n}/{index}")
            image, lowres = model_views(item.pop("pil"), s.resolution, s.lowres, s.train_crop, s.crop, rng)
            item["image"], item["lowres"] = image, lowres
            batch.append(item)
            kept += 1
            if len(batch) == s.micro_batch:
                if not s.precached and encoder is None:
                    from imagen_ds.text.encoders import load_encoder
                    encoder = load_encoder(s.encoder)
                yield _collate(batch, s, encoder, _stats(w, seen, kept, counts, bad_by_shard))
                batch = []
        if batch and not s.resample:  # end of a finite epoch: the last, partial batch
            if not s.precached and encoder is None:
                from imagen_ds.text.encoders import load_encoder
                encoder = load_encoder(s.encoder)
            yield _collate(batch, s, encoder, _stats(w, seen, kept, counts, bad_by_shard))
        elif not s.resample:
            yield {"_stats": _stats(w, seen, kept, counts, bad_by_shard)}


def check_and_decode(raw: dict, s: LoaderSpec) -> dict:
    """One raw sample -> {"pil", "caption", "text_emb", "text_mask"}; raises _Skip(reason)."""
    ext = image_ext(raw)
    missing = [k for k, ok in (("image", ext), ("txt", "txt" in raw), ("npy", "npy" in raw or not s.precached))
               if not ok]
    if missing:
        raise _Skip("missing_key", f"no {', '.join(missing)}")
    meta = {}
    if "json" in raw:
        try:
            meta = decode_json(raw["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise _Skip("bad_metadata", str(e)) from None
    caption = raw["txt"].decode("utf-8", errors="replace").strip()
    emb = mask = None
    if s.precached:
        emb, mask = _embedding(raw["npy"], meta, s)
    try:
        img = Image.open(io.BytesIO(raw[ext]))
        w, h = img.size  # header only: filtering costs no decode
    except Exception as e:  # PIL raises many types for unreadable headers
        raise _Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    if min(w, h) < s.min_side:
        raise _Skip("filtered", f"{w}x{h} < min_side {s.min_side}")
    if img.format == "JPEG":
        # decode JPEGs in the DCT domain at the smallest 1/2^k scale that still covers the
        # model resolution: several times faster for large photos, and a clean box filter
        scale = s.resolution / min(w, h)
        img.draft("RGB", (math.ceil(w * scale), math.ceil(h * scale)))
    try:
        img = img.convert("RGB")  # full decode: truncated/corrupt data fails here
    except Exception as e:
        raise _Skip("corrupt_image", f"{type(e).__name__}: {e}") from None
    return {"pil": img, "caption": caption, "text_emb": emb, "text_mask": mask}


def _embedding(data: bytes, meta: dict, s: LoaderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored [n, D] float16 -> ([T, D] float32 zero-padded, [T] bool) with T = max_tokens."""
    try:
        arr = decode_embedding(data)
    except Exception as e:
        raise _Skip("bad_embedding", f"unreadable .npy: {e}") from None
    if arr.ndim != 2 or arr.shape[1] != s.text_dim or arr.shape[0] == 0 or arr.dtype.kind != "f":
        raise _Skip("bad_embedding", f"shape {arr.shape} {arr.dtype}, expected [tokens, {s.text_dim}] float")
    tokens = meta.get("text_tokens")
    if tokens is not None and tokens != arr.shape[0]:
        raise _Skip("bad_embedding", f"{arr.shape[0]} rows but metadata says {tokens} tokens")
    if not np.isfinite(arr).all():
        raise _Skip("nonfinite_embedding", "NaN or Inf values")
    n = min(arr.shape[0], s.max_tokens)
    emb = np.zeros((s.max_tokens, s.text_dim), dtype=np.float32)
    emb[:n] = arr[:n]
    mask = np.zeros(s.max_tokens, dtype=bool)
    mask[:n] = True
    emb, mask = torch.from_numpy(emb), torch.from_numpy(mask)
    return emb, mask


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack via NumPy: one memcpy per item, no thread-pool start-up on busy cores."""
    return torch.from_numpy(np.stack([t.numpy() for t in tensors]))


def _collate(batch: list[dict], s: LoaderSpec, encoder, stats: dict) -> dict:
    out = {
        "image": _stack([b["image"] for b in batch]),             # [B, 3, S, S]
        "caption": [b["caption"] for b in batch],
        "_stats": stats,
    }
    if s.lowres is not None:
        out["lowres"] = _stack([b["lowres"] for b in batch])  # [B, 3, s, s]
    if s.precached:
        out["text_emb"] = _stack([b["text_emb"] for b in batch])    # [B, T, D]
        out["text_mask"] = _stack([b["text_mask"] for b in batch])  # [B, T]
    else:
        out["text_emb"], out["text_mask"] = encoder.encode(out["caption"], s.max_tokens)
    return out


def _stats(worker: int, seen: int, kept: int, counts: Counter, bad_by_shard: Counter) -> dict:
    return {"worker": worker, "seen": seen, "kept": kept, "skipped": dict(counts),
            "bad_by_shard": dict(bad_by_shard.most_common(3))}


def _too_many_bad(s: LoaderSpec, seen: int, kept: int, counts: Counter, bad_by_shard: Counter) -> Optional[str]:
    if seen < MIN_SAMPLES_FOR_SKIP_CHECK:
        return None
    bad = sum(v for k, v in counts.items() if k != "filtered")
    reasons = ", ".join(f"{k} {v}" for k, v in counts.most_common())
    if bad > s.max_skip_fraction * seen:
        shard, n_bad = bad_by_shard.most_common(1)[0]
        return (f"{shard}: {bad} of {seen} samples were bad ({reasons}), more than data.max_skip_fraction "
                f"{s.max_skip_fraction:g}; this shard has the most bad samples ({n_bad})")
    if kept == 0:
        return (f"none of the first {seen} samples is usable ({reasons}); data.min_side is {s.min_side} "
                f"(shards: {s.urls[0]}{' ...' if len(s.urls) > 1 else ''})")
    return None


# --------------------------------------------------------------------------- the loader


class TrainLoader:
    """Iterable of batch dicts (see make_train_loader). Skip counts: `.skipped`, `.seen`, `.kept`."""

    def __init__(self, spec: LoaderSpec, pin_memory: bool = False):
        self.spec = spec
        self.pin_memory = pin_memory
        self._worker_stats: dict[int, dict] = {}

    def pipeline(self) -> DataPipeline:
        s = self.spec
        return DataPipeline(ShardSource(s), read_tars, SeededShuffle(s), Batcher(s))

    def __iter__(self) -> Iterator[dict]:
        self._worker_stats = {}
        pipe = self.pipeline()  # fresh each time: the same stream on every iteration
        if self.spec.num_workers == 0:
            it = iter(pipe)
        else:
            # own generator: the DataLoader would otherwise draw its base seed from the global
            # torch RNG, shifting the trainer's noise draws after a resume
            gen = torch.Generator().manual_seed(self.spec.seed)
            it = iter(torch.utils.data.DataLoader(pipe, batch_size=None, num_workers=self.spec.num_workers,
                                                  pin_memory=self.pin_memory, prefetch_factor=2, generator=gen))
        for item in it:
            if "_error" in item:
                raise DataError(item["_error"])
            stats = item.pop("_stats")
            self._worker_stats[stats["worker"]] = stats
            if "image" in item:
                yield item

    @property
    def skipped(self) -> dict[str, int]:
        """Samples skipped so far, by reason, over all workers."""
        total: Counter = Counter()
        for st in self._worker_stats.values():
            total.update(st["skipped"])
        return dict(total)

    @property
    def seen(self) -> int:
        return sum(st["seen"] for st in self._worker_stats.values())

    @property
    def kept(self) -> int:
        return sum(st["kept"] for st in self._worker_stats.values())


def make_train_loader(cfg, shards, *, micro_batch: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                      skip_batches: int = 0, workers: Optional[int] = None, resample: bool = True,
                      epoch: int = 0, pin_memory: bool = False) -> TrainLoader:
    """Batches for one rank: {"image" [B,3,S,S], "lowres" [B,3,s,s] (SR), "text_emb" [B,T,D],
    "text_mask" [B,T] bool, "caption" list[str]}, images float32 in [-1, 1].

    resample=True: endless, shards drawn with replacement (training). resample=False: one pass
    over this rank's share of the shards (ranks and workers see disjoint shards), the last
    batch may be short. workers defaults to cfg.data.workers; 0 loads in this process.
    Exact resume needs the same seed, rank, world_size and workers.
    """
    m, t, d = cfg.model, cfg.text, cfg.data
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    spec = LoaderSpec(
        urls=tuple(expand_shards(shards)), resolution=m.resolution, lowres=m.lowres_resolution,
        train_crop=d.train_crop, crop=d.crop, min_side=d.min_side, text_dim=t.dim, max_tokens=t.max_tokens,
        precached=t.precached, encoder=t.encoder, micro_batch=micro_batch, rank=rank, world_size=world_size,
        seed=seed, epoch=epoch, skip_batches=skip_batches, resample=resample, shuffle_buffer=d.shuffle_buffer,
        max_skip_fraction=d.max_skip_fraction, num_workers=d.workers if workers is None else workers)
    return TrainLoader(spec, pin_memory=pin_memory)
