"""Data: prepare-data -> precache-embeddings (t5-tiny-random) -> training loader, on generated images
with known defects, and make-demo-data. Counts are exact: every sample is accounted for."""
import hashlib
import io
import itertools
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from imagen_ds.cli import main
from imagen_ds.config import config_from_dict
from imagen_ds.data import make_train_loader
from imagen_ds.data.format import decode_embedding, decode_json, encode_embedding, encode_json
from imagen_ds.data.shards import iter_tar_samples, write_tar
from imagen_ds.errors import DataError
from imagen_ds.text import load_encoder

N_BIG, N_SMALL = 12, 4   # generated photos above / below the size filter (64 px)


def tiny_cfg(res=32, lowres=None, train_crop=None, min_side=64, crop="center", dim=64, precached=True,
             max_skip_fraction=1.0):
    return config_from_dict({
        "name": "test_data",
        "model": dict(unet="UNet", resolution=res, lowres_resolution=lowres, in_channels=3, base_channels=32,
                      channel_mults=[1, 2], num_res_blocks=[1, 1], attention_resolutions=[], attention_type="fused",
                      mid_attention=False, head_dim=32, num_heads=None, cond_dim=64, dropout=0.0,
                      resblock_updown=False, null_text="learned", checkpoint_activations=False),
        "text": dict(encoder="t5-tiny-random", dim=dim, max_tokens=64, precached=precached),
        "diffusion": {"scheme": "edm"},
        "training": dict(micro_batch=4, global_batch=4, precision="fp32", samples=100),
        "data": dict(min_side=min_side, crop=crop, train_crop=train_crop, workers=0, shuffle_buffer=20,
                     max_skip_fraction=max_skip_fraction),
    })


def photo(w, h, seed):
    """A smooth colourful image (gradients + low-frequency waves): resizing it is well-behaved."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + rng.uniform(0, 6))
             for _ in range(3)]
    arr = ((np.stack(chans, -1) * 0.5 + 0.5) * 255).astype(np.uint8)
    return Image.fromarray(arr)


def jpeg(img):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def tree_digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """photos/ -> raw/ (prepare-data) -> emb/ (precache) -> bad/ (emb/ plus injected defects)."""
    root = tmp_path_factory.mktemp("data")
    photos = root / "photos"
    photos.mkdir()
    for i in range(N_BIG):  # a*: above the filter, with varied aspect ratios
        jpeg_bytes = jpeg(photo(80 + 8 * i, 100 - 2 * i, seed=i))
        (photos / f"a{i:02d}.jpg").write_bytes(jpeg_bytes)
        (photos / f"a{i:02d}.txt").write_text(f"photo {i:02d} of smooth waves")
    for i in range(N_SMALL):  # b*: shorter side 40 < 64
        photo(40, 50, seed=100 + i).save(photos / f"b{i:02d}.png")
        (photos / f"b{i:02d}.txt").write_text(f"small photo {i:02d}")
    (photos / "c_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (photos / "c_corrupt.txt").write_text("a broken file")
    photo(90, 90, seed=7).save(photos / "d_nocaption.png")

    raw, emb = root / "raw", root / "emb"
    r = invoke("prepare-data", "--input", photos, "--out", raw, "--shard-size", 4, "--json")
    assert r.exit_code == 0, r.output
    prep = json.loads(r.output)
    before = tree_digest(raw)
    r = invoke("precache-embeddings", "--shards", raw, "--out", emb, "--encoder", "t5-tiny-random",
               "--max-tokens", 64, "--batch-size", 5, "--json")
    assert r.exit_code == 0, r.output
    pre = json.loads(r.output)
    assert tree_digest(raw) == before  # inputs untouched

    # bad/: emb/ with shard 000002 cut inside its 3rd sample, plus a shard of defective samples
    bad = root / "bad"
    bad.mkdir()
    for p in sorted(emb.glob("*.tar")):
        (bad / p.name).write_bytes(p.read_bytes())
    with tarfile.open(bad / "000002.tar") as t:
        third_image = [m for m in t.getmembers() if m.name.endswith(".jpg")][2]
    data = (bad / "000002.tar").read_bytes()
    (bad / "000002.tar").write_bytes(data[:third_image.offset_data + 200])
    good = list(iter_tar_samples(str(emb / "000000.tar")))
    defects = []
    for i, s in enumerate(good):
        s = dict(s, __key__=f"defect{i}")
        if i == 0:
            s["jpg"] = s["jpg"][: len(s["jpg"]) // 2]                            # truncated image
        elif i == 1:
            s["npy"] = encode_embedding(np.zeros((5, 32)))                       # wrong width
            s["json"] = encode_json({k: v for k, v in decode_json(s["json"]).items() if k != "text_tokens"})
        elif i == 2:
            arr = decode_embedding(s["npy"]).copy()
            arr[0, 0] = np.nan
            s["npy"] = encode_embedding(arr)                                     # NaN
        elif i == 3:
            del s["txt"]                                                         # missing caption
        defects.append(s)
    defects.append(dict(good[0], __key__="defect_ok"))                           # one good sample
    write_tar(bad / "000009.tar", defects)
    return dict(root=root, photos=photos, raw=raw, emb=emb, bad=bad, prep=prep, pre=pre)


def one_epoch(cfg, shards, **kw):
    loader = make_train_loader(cfg, shards, micro_batch=4, seed=0, resample=False, workers=kw.pop("workers", 0), **kw)
    return loader, list(loader)


# --------------------------------------------------------------------------- prepare + precache


def test_prepare_and_precache_report_exact_counts(data):
    assert data["prep"]["written"] == N_BIG + N_SMALL
    assert data["prep"]["shards"] == 4
    assert data["prep"]["skipped"] == {"corrupt_image": 1, "no_caption": 1}
    assert data["pre"]["written"] == 4 and data["pre"]["encoded"] == N_BIG + N_SMALL
    sample = next(iter_tar_samples(str(data["emb"] / "000000.tar")))
    meta = decode_json(sample["json"])
    assert (meta["width"], meta["height"], meta["source"]) == (80, 100, "a00.jpg")
    arr = np.load(io.BytesIO(sample["npy"]), allow_pickle=False)
    assert arr.dtype == np.float16 and arr.shape == (meta["text_tokens"], 64)


def test_prepare_from_csv(tmp_path, data):
    table = tmp_path / "pairs.csv"
    table.write_text("path,caption\n"
                     f"{data['photos'] / 'a00.jpg'},first\n"
                     f"{data['photos'] / 'b00.png'},second\n"
                     "missing.jpg,third\n"
                     f"{data['photos'] / 'a01.jpg'},\n")
    r = invoke("prepare-data", "--input", table, "--out", tmp_path / "out", "--json", "--min-side", 64)
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert report["written"] == 1
    assert report["skipped"] == {"too_small": 1, "missing_file": 1, "empty_caption": 1}
    captions = [s["txt"] for s in iter_tar_samples(str(tmp_path / "out" / "000000.tar"))]
    assert captions == [b"first"]


def test_precache_resumes_and_never_trusts_half_written_shards(data, tmp_path):
    out = tmp_path / "emb"
    r = invoke("precache-embeddings", "--shards", data["raw"], "--out", out, "--encoder", "t5-tiny-random",
               "--max-tokens", 64, "--rank", 0, "--world-size", 2, "--json")
    assert json.loads(r.output)["written"] == 2                      # shards 0 and 2 of 4
    (out / "000001.tar.tmp").write_bytes(b"interrupted half-way")  # a crash mid-shard
    r = invoke("precache-embeddings", "--shards", data["raw"], "--out", out, "--encoder", "t5-tiny-random",
               "--max-tokens", 64, "--json")
    s = json.loads(r.output)
    assert (s["already_done"], s["written"]) == (2, 2)
    assert tree_digest(out) == tree_digest(data["emb"])                # same bytes as one uninterrupted run


# --------------------------------------------------------------------------- loader


def test_loader_counts_every_sample_by_reason(data):
    loader, batches = one_epoch(tiny_cfg(min_side=64), data["bad"])
    # kept: 12 big - 2 lost in the truncated shard + 1 good sample in the defect shard
    assert sum(len(b["caption"]) for b in batches) == loader.kept == 11
    assert loader.skipped == {"filtered": 4, "truncated_tar": 1, "corrupt_image": 1, "bad_embedding": 1,
                              "nonfinite_embedding": 1, "missing_key": 1}


def test_batches_have_contract_shapes_ranges_and_the_encoders_embeddings(data):
    _, batches = one_epoch(tiny_cfg(min_side=64), data["emb"])
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 32) and b["image"].dtype == torch.float32
    assert b["image"].min() >= -1 and b["image"].max() <= 1 and b["image"].std() > 0.1
    assert b["text_emb"].shape == (4, 64, 64) and b["text_emb"].dtype == torch.float32
    assert b["text_mask"].shape == (4, 64) and b["text_mask"].dtype == torch.bool
    assert "lowres" not in b
    emb, mask = load_encoder("t5-tiny-random").encode(b["caption"], 64)
    assert torch.equal(mask, b["text_mask"])
    torch.testing.assert_close(b["text_emb"], emb, atol=2e-2, rtol=1e-2)  # stored as float16


def test_online_encoding_matches_precached(data):
    _, online = one_epoch(tiny_cfg(min_side=64, precached=False), data["raw"])
    _, cached = one_epoch(tiny_cfg(min_side=64), data["emb"])
    assert [b["caption"] for b in online] == [b["caption"] for b in cached]
    torch.testing.assert_close(online[0]["text_emb"], cached[0]["text_emb"], atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("train_crop", [None, 32])
def test_sr_lowres_is_the_downsampled_crop(data, train_crop):
    cfg = tiny_cfg(res=64, lowres=16, train_crop=train_crop, crop="random")
    _, batches = one_epoch(cfg, data["emb"])
    b = batches[0]
    side = train_crop or 64
    assert b["image"].shape == (4, 3, side, side) and b["lowres"].shape == (4, 3, side // 4, side // 4)
    assert b["lowres"].min() >= -1 and b["lowres"].max() <= 1
    pooled = torch.nn.functional.avg_pool2d(b["image"], 4)
    aligned = (pooled - b["lowres"]).abs().mean(dim=(1, 2, 3))
    shifted = (pooled[..., 1:, 1:] - b["lowres"][..., :-1, :-1]).abs().mean(dim=(1, 2, 3))
    assert (aligned < 0.03).all() and (aligned * 3 < shifted).all()


def test_two_ranks_two_workers_see_disjoint_samples_covering_the_epoch(data):
    cfg = tiny_cfg(min_side=0)
    _, everything = one_epoch(cfg, data["emb"])
    seen = []
    for rank in range(2):
        _, batches = one_epoch(cfg, data["emb"], rank=rank, world_size=2, workers=2)
        seen.append([c for b in batches for c in b["caption"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(c for b in everything for c in b["caption"])
    assert len(seen[0]) + len(seen[1]) == N_BIG + N_SMALL


@pytest.mark.parametrize("workers", [0, 2])
def test_skip_batches_resumes_the_exact_stream(data, workers):
    cfg = tiny_cfg(min_side=64, crop="random")
    first = list(itertools.islice(make_train_loader(cfg, data["bad"], micro_batch=3, seed=5, workers=workers), 9))
    resumed = list(itertools.islice(make_train_loader(cfg, data["bad"], micro_batch=3, seed=5, workers=workers,
                                                      skip_batches=5), 4))
    for a, b in zip(first[5:], resumed):
        assert a["caption"] == b["caption"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["text_emb"], b["text_emb"])
    other_seed = next(iter(make_train_loader(cfg, data["bad"], micro_batch=3, seed=6, workers=0)))
    assert other_seed["caption"] != first[0]["caption"] or not torch.equal(other_seed["image"], first[0]["image"])


def test_too_many_bad_samples_stop_with_one_error_naming_the_shard(data):
    cfg = tiny_cfg(min_side=0, dim=32, max_skip_fraction=0.05)  # every stored embedding is 64-d: all bad
    with pytest.raises(DataError) as e:
        next(iter(make_train_loader(cfg, data["emb"], micro_batch=4, seed=0, workers=0)))
    msg = str(e.value)
    assert "\n" not in msg and ".tar" in msg and "bad_embedding" in msg and "max_skip_fraction" in msg


def test_a_filter_that_rejects_everything_is_an_error_not_a_hang(data):
    with pytest.raises(DataError, match="min_side is 4096"):
        next(iter(make_train_loader(tiny_cfg(min_side=4096), data["emb"], micro_batch=4, workers=0)))


def test_cli_errors_are_one_line(data, tmp_path):
    (tmp_path / "empty").mkdir()
    bad_table = tmp_path / "t.csv"
    bad_table.write_text("file,text\nx.jpg,hello\n")
    cases = [
        ("benchmark-data", "--shards", tmp_path / "empty", "--model", "tiny_res_32"),
        ("prepare-data", "--input", bad_table, "--out", tmp_path / "o"),
        ("precache-embeddings", "--shards", data["raw"], "--out", data["raw"], "--encoder", "t5-tiny-random"),
        ("precache-embeddings", "--shards", data["raw"], "--out", tmp_path / "p", "--encoder", "no-such-t5"),
    ]
    for args in cases:
        r = CliRunner().invoke(main, [str(a) for a in args])
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith("error: ") and r.output.count("\n") == 1, r.output


def test_benchmark_data_json(data):
    r = invoke("benchmark-data", "--shards", data["bad"], "--model", "tiny_sr_64", "--workers", "0",
               "--batches", "2", "--json")
    report = json.loads(r.output)
    assert report["samples_per_s"] > 0 and report["workers"] == 0
    assert report["skipped"]["corrupt_image"] >= 0 and isinstance(report["skipped"], dict)


# --------------------------------------------------------------------------- synthetic demo data


def test_make_demo_data_is_deterministic_and_holds_out_combinations(tmp_path):
    from imagen_ds.data.synthetic import PALETTE, caption, draw_shape

    for d in ("a", "b"):
        r = invoke("make-demo-data", "--out", tmp_path / d, "--n", 120, "--shard-size", 50, "--size", 64)
        assert r.exit_code == 0, r.output
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    held = json.loads((tmp_path / "a" / "heldout.json").read_text())["heldout"]
    held_captions = {h["caption"] for h in held}
    assert len(held) >= 5
    train = [s for p in sorted((tmp_path / "a").glob("*.tar")) for s in iter_tar_samples(str(p))]
    captions = {s["txt"].decode() for s in train}
    assert len(train) == 120 and not captions & held_captions
    words = lambda cs: {w for c in cs for w in c.split()}  # noqa: E731
    assert words(held_captions) <= words(captions)        # held-out words all seen in training
    img = np.asarray(Image.open(io.BytesIO(train[0]["png"])))
    assert img.shape == (64, 64, 3) and "npy" in train[0]
    meta = decode_json(train[0]["json"])
    assert train[0]["txt"].decode() == caption(meta["color"], meta["shape"], meta["background"])

    # the generator's own image: the corner is the background, the most common other colour is the shape's
    pic = np.asarray(draw_shape("orange", "triangle", "gray", seed=3, size=64)).reshape(-1, 3)
    colors, counts = np.unique(pic, axis=0, return_counts=True)
    top = [tuple(int(v) for v in c) for c in colors[np.argsort(-counts)][:2]]
    assert set(top) == {PALETTE["orange"], PALETTE["gray"]}


def test_loading_leaves_the_global_rng_alone(data):
    """The trainer draws noise from torch's global RNG; the loader must not move it (exact resume)."""
    torch.manual_seed(0)
    state = torch.get_rng_state()
    for workers in (0, 2):
        next(iter(make_train_loader(tiny_cfg(min_side=0), data["emb"], micro_batch=2, workers=workers)))
    next(iter(make_train_loader(tiny_cfg(min_side=0, precached=False), data["raw"], micro_batch=2, workers=0)))
    assert torch.equal(torch.get_rng_state(), state)
