"""prepare-data: a folder of images with same-named .txt captions, or a CSV/Parquet of
path,caption rows, -> webdataset shards of the format in data/format.py (without embeddings;
run precache-embeddings next).

Every image is fully decoded once here, so unreadable files are reported now rather than
during training. Original bytes are kept for JPEG/PNG/WebP; other PIL formats become PNG.
"""
from __future__ import annotations

import csv
import io
import os
from collections import Counter
from pathlib import Path
from typing import Iterator, Optional

from PIL import Image

from imagen_ds.data.format import encode_json
from imagen_ds.errors import ConfigError

KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def _folder_items(root: Path) -> Iterator[tuple[Path, Optional[str], str]]:
    """(image path, caption or None, source id) for every image under root, sorted."""
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        txt = path.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else None
        yield path, caption, str(path.relative_to(root))


def _table_rows(table: Path) -> list[dict]:
    if table.suffix.lower() == ".csv":
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            columns = reader.fieldnames or []
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(str(table), "--input", "reading Parquet needs pyarrow (pip install pyarrow); "
                              "or give a CSV with columns path,caption") from None
        rows = pq.read_table(table).to_pylist()
        columns = list(rows[0]) if rows else ["path", "caption"]
    missing = [c for c in ("path", "caption") if c not in columns]
    if missing:
        raise ConfigError(str(table), "columns", f"missing {', '.join(missing)}; expected columns path,caption "
                          f"(found {', '.join(columns) or 'none'})")
    return rows


def _table_items(table: Path) -> Iterator[tuple[Path, Optional[str], str]]:
    for row in _table_rows(table):
        path = Path(str(row["path"]))
        if not path.is_absolute():
            path = table.parent / path  # relative paths are relative to the table's folder
        caption = row.get("caption")
        yield path, None if caption is None else str(caption), str(row["path"])


def _encode_image(path: Path, counts: Counter, min_side: int) -> Optional[tuple[str, bytes, int, int]]:
    """(ext, bytes, width, height) or None (counted) if the image is unusable."""
    try:
        data = path.read_bytes()
    except OSError:
        counts["missing_file"] += 1
        return None
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()  # full decode: catches truncated and corrupt files now
    except Exception:
        counts["corrupt_image"] += 1
        return None
    w, h = img.size
    if min(w, h) < min_side:
        counts["too_small"] += 1
        return None
    if fmt in KEEP_FORMATS:
        return KEEP_FORMATS[fmt], data, w, h
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return "png", buf.getvalue(), w, h


def prepare_data(input_path: str | os.PathLike, out: str | os.PathLike, *, shard_size: int = 1000,
                 min_side: int = 0, progress: bool = False) -> dict:
    """Write shards OUT/000000.tar, ...; returns {"written", "shards", "skipped": {reason: n}}."""
    import webdataset as wds
    from tqdm import tqdm

    src = Path(input_path)
    out = Path(out)
    if shard_size < 1:
        raise ConfigError("--shard-size", str(shard_size), "must be >= 1")
    if src.is_dir():
        items = list(_folder_items(src))
    elif src.suffix.lower() in (".csv", ".parquet"):
        items = list(_table_items(src))
    else:
        raise ConfigError("--input", str(src), "expected a folder of images + .txt captions, or a .csv/.parquet "
                          "with columns path,caption")
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    written = 0
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=shard_size, verbose=0) as sink:
        for path, caption, source in tqdm(items, desc="prepare-data", unit="img", disable=not progress):
            if caption is None:
                counts["no_caption"] += 1
                continue
            caption = caption.strip()
            if not caption:
                counts["empty_caption"] += 1
                continue
            image = _encode_image(path, counts, min_side)
            if image is None:
                continue
            ext, data, w, h = image
            sink.write({"__key__": f"{written:09d}", ext: data, "txt": caption.encode("utf-8"),
                        "json": encode_json({"width": w, "height": h, "source": source})})
            written += 1
    shards = -(-written // shard_size)
    if written == 0:
        (out / "000000.tar").unlink(missing_ok=True)  # ShardWriter opens its first shard eagerly
    return {"written": written, "shards": shards, "skipped": dict(counts), "out": str(out)}
