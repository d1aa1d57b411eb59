"""The shard sample format (see docs/data.md).

One sample = files sharing a key inside a webdataset .tar:
  KEY.jpg | KEY.png | KEY.webp   the image, original bytes
  KEY.txt                        the caption, UTF-8
  KEY.json                       {"width", "height", "source"} and, after precaching,
                                 {"text_tokens": n, "text_encoder": name, "text_max_tokens": T}
  KEY.npy                        (after precaching) float16 [n, D]: the T5 states of the n valid
                                 tokens only; the loader pads to text.max_tokens and builds the mask
No pickle anywhere: embeddings are written with np.save and read with allow_pickle=False.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
META_EXT = "json"
EMB_EXT = "npy"


def image_ext(sample: dict) -> str | None:
    """The sample's image extension, or None if it has no image."""
    for ext in IMAGE_EXTS:
        if ext in sample:
            return ext
    return None


def encode_embedding(emb: np.ndarray) -> bytes:
    """[n, D] embedding -> .npy bytes (float16)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(emb, dtype=np.float16), allow_pickle=False)
    return buf.getvalue()


def decode_embedding(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True).encode("utf-8")


def decode_json(data: bytes) -> dict[str, Any]:
    obj = json.loads(data.decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError("metadata is not a JSON object")
    return obj
