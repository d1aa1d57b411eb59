"""benchmark-data: training-loader throughput with a model's own transforms."""
from __future__ import annotations

import time
from typing import Optional

from imagen_ds.data.format import decode_embedding
from imagen_ds.data.shards import TruncatedTar, expand_shards, iter_tar_samples


def _shard_text_dim(urls: list[str]) -> Optional[int]:
    """Embedding width stored in the first shard that has one (None: no embeddings)."""
    for url in urls[:5]:
        try:
            for sample in iter_tar_samples(url):
                if "npy" in sample:
                    arr = decode_embedding(sample["npy"])
                    return int(arr.shape[-1]) if arr.ndim == 2 else None
        except TruncatedTar:
            continue
    return None


def benchmark_data(shards, model_name: str, *, workers: Optional[int] = None, batches: int = 20,
                   batch_size: Optional[int] = None, seed: int = 0) -> dict:
    """Time `batches` batches after one warm-up batch. Returns samples/s, per worker, skip counts."""
    from imagen_ds.config import load_config
    from imagen_ds.data.loader import make_train_loader

    cfg = load_config(model_name)
    urls = expand_shards(shards)
    notes = []
    dim = _shard_text_dim(urls)
    if cfg.text.precached and dim is not None and dim != cfg.text.dim:
        # the transforms are what we time; shards embedded by another encoder still measure them
        notes.append(f"text.dim {cfg.text.dim} -> {dim} (the shards' embedding width)")
        cfg = cfg.replace(text={"dim": dim})
    workers = cfg.data.workers if workers is None else workers
    batch_size = batch_size or cfg.training.micro_batch
    loader = make_train_loader(cfg, urls, micro_batch=batch_size, seed=seed, workers=workers)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    warm, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(it)
    end, cpu = time.perf_counter(), time.process_time() - cpu
    samples_per_s = batches * batch_size / (end - warm)
    return {
        "model": cfg.name, "shards": len(urls), "workers": workers, "batch_size": batch_size, "batches": batches,
        "resolution": cfg.model.resolution, "lowres_resolution": cfg.model.lowres_resolution,
        "train_crop": cfg.data.train_crop, "min_side": cfg.data.min_side, "precached": cfg.text.precached,
        "samples_per_s": round(samples_per_s, 2),
        "samples_per_s_per_worker": round(samples_per_s / max(1, workers), 2),
        "first_batch_s": round(warm - start, 3),
        # with workers=0 all loading runs in this process: samples per CPU-second is then a
        # figure that holds on a shared, busy machine, where wall-clock rates do not
        "samples_per_cpu_s": round(batches * batch_size / cpu, 2) if workers == 0 and cpu > 0 else None,
        "seen": loader.seen, "kept": loader.kept, "skipped": loader.skipped, "notes": notes,
    }


def format_report(r: dict) -> str:
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(r["skipped"].items())) or "none"
    lines = [
        f"{r['model']}: {r['samples_per_s']:.1f} samples/s with {r['workers']} workers "
        f"({r['samples_per_s_per_worker']:.1f} per worker), batch {r['batch_size']} x {r['batches']}, "
        f"first batch {r['first_batch_s']:.2f} s"
        + (f", {r['samples_per_cpu_s']:.1f} samples per CPU-second" if r["samples_per_cpu_s"] else ""),
        f"  views: {r['resolution']} px" + (f", low-res {r['lowres_resolution']} px" if r["lowres_resolution"] else "")
        + (f", crops {r['train_crop']} px" if r["train_crop"] else "") + f", min_side {r['min_side']}",
        f"  samples seen {r['seen']}, kept {r['kept']}, skipped: {skipped}",
    ]
    lines += [f"  note: {n}" for n in r["notes"]]
    return "\n".join(lines)
