"""precache-embeddings: read shards, encode captions with T5 once, write shards with .npy added.

Inputs are never modified. Each output shard is written to NAME.tar.tmp and renamed to
NAME.tar when complete, so an existing NAME.tar is a finished shard and a rerun after an
interruption skips it (resume). Several processes (GPUs) split the shard list by rank:
shard i goes to rank i % world_size.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from imagen_ds.data.format import decode_json, encode_embedding, encode_json
from imagen_ds.data.shards import TruncatedTar, expand_shards, iter_tar_samples, write_tar
from imagen_ds.errors import ConfigError

log = logging.getLogger(__name__)


def embed_samples(samples: list[dict], encoder, max_tokens: int, batch_size: int = 256) -> tuple[list[dict], Counter]:
    """Add KEY.npy (float16 [n_valid, D]) and the token count to KEY.json of each captioned sample.

    Samples without a caption pass through unchanged (the loader will report them).
    """
    counts: Counter = Counter()
    captioned = [s for s in samples if "txt" in s]
    counts["no_caption"] = len(samples) - len(captioned)
    for i in range(0, len(captioned), batch_size):
        chunk = captioned[i:i + batch_size]
        texts = [s["txt"].decode("utf-8", errors="replace").strip() for s in chunk]
        emb, mask = encoder.encode(texts, max_tokens)          # [B, T, D], [B, T]
        for s, e, m in zip(chunk, emb, mask):
            n = int(m.sum())
            s["npy"] = encode_embedding(e[:n].numpy())       # valid tokens only
            meta = decode_json(s["json"]) if "json" in s else {}
            meta.update(text_tokens=n, text_encoder=encoder.name, text_max_tokens=max_tokens)
            s["json"] = encode_json(meta)
        counts["encoded"] += len(chunk)
    return samples, counts


def _rank_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ConfigError("--rank", str(rank), f"expected 0 <= rank < world size ({world_size})")
    return rank, world_size


def precache_embeddings(shards, out: str | Path, encoder: str, *, max_tokens: int = 128, batch_size: int = 64,
                        device: Optional[str] = None, rank: Optional[int] = None,
                        world_size: Optional[int] = None, progress: bool = False) -> dict:
    """Encode the captions of this rank's shards into OUT. Returns counts and the shard lists."""
    from tqdm import tqdm

    from imagen_ds.text.encoders import load_encoder

    rank, world_size = _rank_world(rank, world_size)
    inputs = expand_shards(shards)
    out = Path(out)
    names = [Path(p).name for p in inputs]
    if len(set(names)) != len(names):
        raise ConfigError("--shards", str(shards), "two input shards share a file name; outputs would collide")
    if any(Path(p).resolve().parent == out.resolve() for p in inputs):
        raise ConfigError("--out", str(out), "is the input directory; inputs are left untouched, choose another")
    out.mkdir(parents=True, exist_ok=True)
    mine = inputs[rank::world_size]
    todo = [p for p in mine if not (out / Path(p).name).exists()]
    summary = {"rank": rank, "world_size": world_size, "shards": len(mine), "already_done": len(mine) - len(todo),
               "written": 0, "encoded": 0, "no_caption": 0, "truncated_shards": []}
    if not todo:
        return summary
    if device is None:
        local = int(os.environ.get("LOCAL_RANK", 0))
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    enc = load_encoder(encoder, device=device)
    for path in tqdm(todo, desc=f"precache rank {rank}", unit="shard", disable=not progress):
        samples = []
        try:
            for s in iter_tar_samples(path):
                samples.append(s)
        except TruncatedTar as e:
            log.warning("precache: %s; keeping the %d complete samples before the cut", e, len(samples))
            summary["truncated_shards"].append(path)
        samples, counts = embed_samples(samples, enc, max_tokens, batch_size)
        write_tar(out / Path(path).name, samples)
        summary["written"] += 1
        summary["encoded"] += counts["encoded"]
        summary["no_caption"] += counts["no_caption"]
    return summary
