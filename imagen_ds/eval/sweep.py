"""`imagen-ds evaluate`: FID and CLIP score for every checkpoint x guidance weight.

Layout of --out:
  prompts.json                         the prompt of each image index (+ seed); guards resumes
  samples/<label>/g<w>/000000.png ...  generated images; existing ones are not redone
  samples/<label>/g<w>/meta.json       what made them (checkpoints, sampling); guards resumes
  ref_stats.pt                         cached reference FID statistics
  results.json, results.md, fid_vs_clip.png
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm import tqdm

from imagen_ds.errors import ConfigError
from imagen_ds.eval.clip_score import DEFAULT_MODEL, CLIPScorer, clip_score
from imagen_ds.eval.fid import FID, TINY_RANDOM
from imagen_ds.eval.inputs import (iter_reference_images, load_png_uint8, read_prompts, reference_sources, save_png,
                                   select_prompts)
from imagen_ds.eval.report import write_results


@dataclass
class SweepSettings:
    checkpoints: list[str]
    prompts: str
    ref_images: str
    guidance: list[float]
    out: str = "eval_out"
    num_samples: Optional[int] = None       # None: one image per prompt in the file
    steps: Optional[int] = None             # None: each config's sampling.steps
    sampler: Optional[str] = None
    inception_weights: Optional[str] = None  # None: torch-fidelity's download; "tiny-random": offline
    clip_model: str = DEFAULT_MODEL
    sr256: Optional[str] = None
    sr1024: Optional[str] = None
    batch_size: int = 16
    seed: int = 0
    device: Optional[str] = None            # None: cuda if available
    max_ref_images: Optional[int] = None    # None: the whole reference set
    progress: bool = True
    sr: list = field(init=False, default_factory=list)

    def __post_init__(self):
        if not self.checkpoints:
            raise ConfigError("--checkpoints", "", "give at least one checkpoint")
        if not self.guidance:
            raise ConfigError("--guidance", "", "give at least one guidance weight")
        if self.batch_size < 1:
            raise ConfigError("--batch-size", str(self.batch_size), "must be >= 1")
        if self.sr1024 and not self.sr256:
            raise ConfigError("--sr1024", self.sr1024, "needs --sr256 (the cascade is base -> 256 -> 1024)")
        self.sr = [(n, p) for n, p in (("sr256", self.sr256), ("sr1024", self.sr1024)) if p]
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")


def run_sweep(s: SweepSettings, *, feature_net: Optional[nn.Module] = None) -> dict:
    """Generate what is missing, measure every point, write the reports; returns results.json's dict."""
    device = torch.device(s.device)
    out = Path(s.out)
    _preflight(s, feature_net)
    all_prompts = read_prompts(s.prompts)
    prompts = select_prompts(all_prompts, s.num_samples, s.seed)
    if len(prompts) < 2:
        raise ConfigError("--num-samples", str(len(prompts)), "FID needs at least 2 images per point")
    _guard(out / "prompts.json", {"seed": s.seed, "prompts": prompts}, "prompts or --seed")
    labels = checkpoint_labels(s.checkpoints)

    from imagen_ds.eval.generate import TextCache

    text = TextCache(device)  # each text encoder loads once for the whole sweep (t5-11b's: ~20 GB fp32)
    points, stage_info, generated = [], {}, 0
    for ckpt, label in zip(s.checkpoints, labels):
        stages = None
        for w in s.guidance:
            d = out / "samples" / label / f"g{w:g}"
            missing = [i for i in range(len(prompts)) if not (d / f"{i:06d}.png").is_file()]
            if stages is None and (missing or label not in stage_info):
                stages = _load(ckpt, s, device)
                stage_info[label] = [st.describe() for st in stages]
            meta = {"checkpoint": str(Path(ckpt).resolve()), "cascade": stage_info[label], "guidance": w, "seed": s.seed,
                    "batch_size": s.batch_size}
            _guard(d / "meta.json", {k: meta[k] for k in ("checkpoint", "cascade", "guidance", "seed")},
                   "checkpoints or sampling settings", full=meta)
            if missing:
                generated += _generate(stages, prompts, missing, d, w, s, text, f"{label} w={w:g}")
            points.append({"checkpoint": ckpt, "label": label, "guidance": w, "dir": d})
        del stages
    del text  # free the encoder (and GPU memory) before the metric networks load
    if device.type == "cuda":
        torch.cuda.empty_cache()

    size = load_png_uint8(points[0]["dir"] / "000000.png").shape[-1]
    fid = FID(feature_net, inception_weights=s.inception_weights, device=device)
    _reference_statistics(fid, s, size, out, cache=feature_net is None)
    clip = CLIPScorer(s.clip_model, device=device)

    rows = []
    for p in tqdm(points, desc="metrics", disable=not s.progress):
        fid_value, clip_mean, clip_std = _measure(p["dir"], prompts, size, fid, clip, s.batch_size)
        rows.append({"checkpoint": p["checkpoint"], "label": p["label"], "guidance": p["guidance"],
                     "fid": fid_value, "clip_score": clip_mean, "clip_score_std": clip_std,
                     "num_images": len(prompts), "sample_dir": str(p["dir"]),
                     "cascade": stage_info[p["label"]]})
    results = {"protocol": _protocol(s, all_prompts, prompts, size, fid, clip, stage_info),
               "results": rows, "generated_this_run": generated}
    write_results(results, out)
    return results


def _preflight(s: SweepSettings, feature_net: Optional[nn.Module]) -> None:
    """Catch bad metric inputs before hours of sampling, not after."""
    import importlib.util

    from imagen_ds.eval import clip_score, fid

    reference_sources(s.ref_images)
    if feature_net is None and s.inception_weights != fid.TINY_RANDOM:
        fid._inception_kwargs(s.inception_weights)
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ConfigError("--inception-weights", s.inception_weights or "<default>",
                              "the Inception-v3 FID network needs torch-fidelity: `pip install torch-fidelity` "
                              f"(or pass --inception-weights {fid.TINY_RANDOM} for a mechanics-only run)")
    if s.clip_model != clip_score.TINY_RANDOM:
        from transformers import CLIPConfig

        if s.clip_model.startswith((".", "/", "~")) and not Path(s.clip_model).expanduser().is_dir():
            raise ConfigError("--clip-model", s.clip_model, "no such directory (a CLIP model saved with "
                              f"save_pretrained), nor a hub name, nor '{clip_score.TINY_RANDOM}'")
        try:
            CLIPConfig.from_pretrained(s.clip_model)
        except (OSError, ValueError) as e:
            raise ConfigError("--clip-model", s.clip_model, f"cannot load a CLIP config from it "
                              f"({str(e).splitlines()[0]}); pass a local directory saved with "
                              f"save_pretrained, or '{clip_score.TINY_RANDOM}'") from None


def checkpoint_labels(paths: list[str]) -> list[str]:
    """Short unique directory-safe names: the last path part, more parts where names collide."""
    parts = [Path(p.rstrip("/")).with_suffix("").parts if p.endswith(".safetensors") else Path(p.rstrip("/")).parts
             for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        labels = ["_".join(x[-depth:]).replace(" ", "_") for x in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{i}_{x[-1]}" for i, x in enumerate(parts)]  # the same path given twice


def _load(ckpt: str, s: SweepSettings, device: torch.device):
    from imagen_ds.eval.generate import load_cascade

    return load_cascade(ckpt, s.sr, device, s.steps, s.sampler)


def _generate(stages, prompts: list[str], missing: list[int], d: Path, w: float, s: SweepSettings,
              text, desc: str) -> int:
    from imagen_ds.eval.generate import sample_batch

    d.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(missing), desc=desc, unit="img", disable=not s.progress) as bar:
        for start in range(0, len(missing), s.batch_size):
            idx = missing[start:start + s.batch_size]
            seed = s.seed * 1_000_003 + idx[0]  # a batch's noise depends on where it starts, not on the run
            images = sample_batch(stages, [prompts[i] for i in idx], w, seed, text)  # [B, 3, R, R]
            for i, image in zip(idx, images):
                save_png(image, d / f"{i:06d}.png")
            bar.update(len(idx))
    return len(missing)


def _reference_statistics(fid: FID, s: SweepSettings, size: int, out: Path, cache: bool) -> None:
    key = {"ref": str(Path(s.ref_images).resolve()), "size": size, "max": s.max_ref_images,
           "network": s.inception_weights or "default", "feature": fid.description}
    path = out / "ref_stats.pt"
    if cache and path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("key") == json.dumps(key, sort_keys=True):
            fid.load_real_state(saved["state"])
            return
    batches = iter_reference_images(s.ref_images, size, s.batch_size, s.max_ref_images)
    for batch in tqdm(batches, desc="reference images", unit="batch", disable=not s.progress):
        fid.add_real(batch)
    if cache:
        torch.save({"key": json.dumps(key, sort_keys=True), "state": fid.real_state()}, path)


def _measure(d: Path, prompts: list[str], size: int, fid: FID, clip: CLIPScorer, batch_size: int):
    fid.reset_fake()
    scores = []
    for start in range(0, len(prompts), batch_size):
        idx = range(start, min(start + batch_size, len(prompts)))
        images = torch.stack([load_png_uint8(d / f"{i:06d}.png") for i in idx])  # [B, 3, S, S] uint8
        if images.shape[-1] != size:
            raise ConfigError("--checkpoints", str(d), f"images are {images.shape[-1]} px, others {size} px: "
                              "every point of a sweep must end at the same resolution")
        fid.add_fake(images)
        scores.append(clip.scores([im.permute(1, 2, 0).numpy() for im in images], [prompts[i] for i in idx]))
    scores = torch.cat(scores)
    std = float(scores.std()) if len(scores) > 1 else 0.0
    return fid.compute(), clip_score(scores), std


def _guard(path: Path, expected: dict, what: str, full: Optional[dict] = None) -> None:
    """Write `full or expected` as JSON once; later runs must match it (else the images are stale)."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if {k: saved.get(k) for k in expected} != json.loads(json.dumps(expected)):
            raise ConfigError("--out", str(path.parent), f"holds images made with other {what}; "
                              "use a new --out (or delete that folder)")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full or expected, indent=1) + "\n")


def _protocol(s: SweepSettings, all_prompts, prompts, size, fid: FID, clip: CLIPScorer, stage_info) -> dict:
    import torchmetrics
    import transformers

    ip = clip.processor.image_processor
    edge = (ip.size or {}).get("shortest_edge")
    crop = ip.crop_size or {}
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    if s.num_samples is None or s.num_samples == len(all_prompts):
        selection = "every prompt of the file once, in order"
    elif s.num_samples < len(all_prompts):
        selection = f"{len(prompts)} prompts drawn at random without replacement (seed {s.seed})"
    else:
        selection = "the file's prompts cycled"
    first = next(iter(stage_info.values()))
    sampling = ", ".join(f"{st['stage']} {st['resolution']}px {st['sampler']} {st['steps']} steps"
                         + (" (guidance swept)" if st["stage"] == "base" else f" guidance {st['guidance']:g}")
                         for st in first)
    return {
        "prompts": str(s.prompts), "num_prompts_in_file": len(all_prompts), "selection": selection,
        "prompts_sha256_16": digest, "num_images": len(prompts), "seed": s.seed, "image_size": size,
        "sampling": sampling, "guidance": list(s.guidance),
        "fid": {
            "library": f"torchmetrics {torchmetrics.__version__} FrechetInceptionDistance",
            "feature_network": fid.description, "reference": str(s.ref_images), "num_reference": fid.num_real,
            "num_generated": len(prompts),
            "resize": (f"generated {size}x{size} PNGs as they are; reference images centre-cropped to a square "
                       f"and resized to {size}x{size} (PIL bicubic); uint8 into the feature network, which "
                       "resizes to its own input (Inception: 299x299 bilinear, antialiased)"),
        },
        "clip": {
            "library": f"transformers {transformers.__version__} CLIPModel",
            "model": s.clip_model, "model_short": Path(s.clip_model).name or s.clip_model,
            "definition": "max(mean over images of 100 * cos(image, prompt), 0): x100, clipped at 0, "
                          "as torchmetrics CLIPScore computes it",
            "scale": 100, "clipped_at_zero": True,
            "resize": f"CLIPProcessor: shortest side to {edge} (bicubic), centre crop "
                      f"{crop.get('height')}x{crop.get('width')}; prompts truncated to {clip.context} tokens",
        },
    }
