"""T5 text encoders: a hub name or local path, or the offline `t5-tiny-random`, one code path.

Every encoder is a transformers `T5EncoderModel` plus a tokenizer. `encode` pads/truncates to
`max_tokens`, returns float32 embeddings with the padded positions zeroed, and a bool mask
(True = valid token). Padded positions are zeroed so that embeddings stored trimmed to their
valid tokens (precached shards) and embeddings computed online are the same tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from imagen_ds.errors import ConfigError

# Known names -> (hub id, width). t5-11b is the Imagen/NeMo encoder; "t5-xxl" means T5 v1.1 XXL
# (DeepFloyd IF's encoder), the one with 4096-d states.
KNOWN_ENCODERS = {
    "t5-11b": ("google-t5/t5-11b", 1024),
    "t5-v1_1-xxl": ("google/t5-v1_1-xxl", 4096),
    "t5-xxl": ("google/t5-v1_1-xxl", 4096),
}
TINY_RANDOM = "t5-tiny-random"
TINY_DIM = 64


class TextEncoder:
    """A frozen T5 encoder: `encode(captions, max_tokens) -> (emb [B,T,D] f32, mask [B,T] bool)`."""

    def __init__(self, name: str, model, tokenizer, device: str | torch.device):
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dim = int(model.config.d_model)

    @torch.inference_mode()
    def encode(self, captions: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(list(captions), max_length=max_tokens, padding="max_length",
                                truncation=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)                   # [B, T]
        mask = tokens["attention_mask"].to(self.device).bool()      # [B, T]
        emb = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, D]
        emb = emb.float() * mask[..., None]
        return emb.cpu(), mask.cpu()

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, dim={self.dim}, device={self.device})"


def _tiny_random():
    """A 2-layer, 64-d T5 encoder with random weights (seed 0) and the file-less byte tokenizer."""
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    tokenizer = ByT5Tokenizer()
    config = T5Config(vocab_size=len(tokenizer), d_model=TINY_DIM, num_layers=2, num_heads=4, d_kv=16,
                      d_ff=128, dropout_rate=0.0)
    # fork_rng: building the encoder must not move the caller's global RNG (exact training resume)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = T5EncoderModel(config)
    make_context_sensitive(model)
    return model, tokenizer


def local_attention_bias(num_buckets: int, num_heads: int) -> torch.Tensor:
    """T5 relative-attention bias [buckets, heads] that makes each head look at nearby bytes.

    T5's bucket k (< num_buckets/2) is a key k positions before the query, bucket num_buckets/2 + k
    one k positions after; distances below 8 are exact, larger ones log-spaced. Heads cycle
    through: the next few bytes, the previous few, further ahead, further back.
    """
    half = num_buckets // 2

    def distance(k: int) -> int:  # roughly the distance a log-spaced bucket stands for
        return k if k < 8 else 8 + 2 * (k - 8)

    bias = torch.full((num_buckets, num_heads), -8.0)
    for k in range(half):
        d = distance(k)
        for h in range(num_heads):
            ahead, near = h % 2 == 0, (h // 2) % 2 == 0
            if (1 <= d <= 6) if near else (4 <= d <= 16):
                bias[half + k if ahead else k, h] = -(0.3 if near else 0.1) * d
    return bias


def make_context_sensitive(model) -> None:
    """Give the random encoder what a trained T5 has: a byte's state depends on its neighbours.

    With T5's default random init the relative bias is tiny, attention is near-uniform and a
    byte's output is almost independent of where it sits ("blue" as the shape's colour and as
    the background's: cosine 0.999), so "a blue circle on a white background" and its swap
    read the same. Local heads plus smaller token embeddings (so the mixed-in context weighs
    more) bring that cosine to 0.85 while different words stay far apart.
    """
    attn = model.encoder.block[0].layer[0].SelfAttention
    with torch.no_grad():
        attn.relative_attention_bias.weight.copy_(
            local_attention_bias(attn.relative_attention_num_buckets, attn.n_heads))
        model.shared.weight.mul_(0.35)
        for block in model.encoder.block:
            block.layer[0].SelfAttention.o.weight.mul_(2.0)


def _pretrained(name: str, dtype: Optional[torch.dtype]):
    from transformers import AutoTokenizer, T5EncoderModel

    source = KNOWN_ENCODERS[name][0] if name in KNOWN_ENCODERS else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = T5EncoderModel.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError("text.encoder", name,
                          f"cannot load T5 encoder from {source!r} (no network here? pass a local "
                          f"directory with config.json, weights and tokenizer files): {first}") from None
    return model, tokenizer


def load_encoder(name: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None) -> TextEncoder:
    """Load a T5 encoder by name ("t5-11b", "t5-v1_1-xxl", "t5-xxl", "t5-tiny-random") or local path.

    dtype defaults to bf16 on CUDA and fp32 elsewhere.
    """
    device = torch.device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == TINY_RANDOM:
        model, tokenizer = _tiny_random()
    elif name in KNOWN_ENCODERS or Path(name).exists() or "/" in name:
        model, tokenizer = _pretrained(name, dtype)
    else:
        raise ConfigError("text.encoder", name, f"unknown encoder; expected one of "
                          f"{', '.join([*KNOWN_ENCODERS, TINY_RANDOM])} or a local directory")
    return TextEncoder(name, model.to(device=device, dtype=dtype), tokenizer, device)


def expected_dim(name: str) -> Optional[int]:
    """Width of a known encoder without loading it (None for a local path)."""
    if name == TINY_RANDOM:
        return TINY_DIM
    return KNOWN_ENCODERS[name][1] if name in KNOWN_ENCODERS else None
