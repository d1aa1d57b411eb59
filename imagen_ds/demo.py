"""`imagen-ds demo`: train a small text-to-image model offline on CPU and show it learned the text.

The steps, in order:
  1. data    synthetic shapes shards ("a red circle on a blue background") with t5-tiny-random
             embeddings precached; some colour/shape/background combinations are held out;
  2. train   demo_res_32 with the real engine (DeepSpeed ZeRO-2, bf16 where the CPU has it)
             for a fixed budget of minutes and/or steps, EMA as in the trainer, one checkpoint;
  3. sample  the held-out captions with classifier-free guidance, and the same model with the
             text dropped (the unconditional baseline);
  4. check   each sample's colour and shape against its caption (imagen_ds.eval.alignment);
  5. report  summary.json, a grid PNG with the captions under the images, a printed summary.

The checkpoint in OUT/run is a normal training checkpoint: `imagen-ds sample --base OUT/run`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import platform
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from imagen_ds.config import ImagenConfig, load_config

REPO_DOCS = Path(__file__).resolve().parent.parent / "docs"
CELL = 4  # grid images are shown 4x larger (nearest neighbour): 32 px -> 128 px


# --------------------------------------------------------------------------- settings


def cpu_has_bf16() -> bool:
    """bf16 is only worth it where the CPU computes in bf16 natively (AVX512-BF16 / AMX)."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(cfg: ImagenConfig, precision: str) -> ImagenConfig:
    """precision 'auto': bf16 where supported, else fp32; 'bf16' / 'fp32' as given."""
    if precision == "auto":
        precision = "bf16" if cpu_has_bf16() else "fp32"
    return cfg.replace(training={"precision": precision})


def machine() -> str:
    import os

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name}, {cores} cores, torch {torch.__version__}"


# --------------------------------------------------------------------------- 1. data


def encoder_fingerprint(cfg: ImagenConfig) -> str:
    """A digest of what the encoder makes of one caption: precached embeddings from another
    version of the encoder (same name, other weights) must not be reused."""
    import hashlib

    from imagen_ds.text import load_encoder

    emb, _ = load_encoder(cfg.text.encoder).encode(["a red circle on a blue background"], cfg.text.max_tokens)
    return hashlib.sha256(emb.to(torch.bfloat16).float().numpy().tobytes()).hexdigest()[:16]


def make_data(cfg: ImagenConfig, out: Path, n: int, seed: int) -> dict:
    """Shards with precached embeddings in OUT/data; reused when a previous run made the same ones."""
    from imagen_ds.data.synthetic import make_demo_data

    info_path = out / "heldout.json"
    want = {"n": n, "seed": seed, "size": cfg.model.resolution, "encoder": cfg.text.encoder,
            "encoder_fingerprint": encoder_fingerprint(cfg)}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if all(info.get(k) == v for k, v in want.items()) and list(out.glob("*.tar")):
            print(f"[1/4] data: reusing {n} images in {out}")
            return info
    for stale in out.glob("*.tar"):  # shards of another size/seed/encoder must not join the new ones
        stale.unlink()
    print(f"[1/4] data: drawing {n} captioned images, embedding captions with {cfg.text.encoder}")
    info = make_demo_data(out, n, seed=seed, size=cfg.model.resolution, encoder=cfg.text.encoder,
                          max_tokens=cfg.text.max_tokens, shard_size=max(1, min(n, 2000)), progress=True)
    info["encoder_fingerprint"] = want["encoder_fingerprint"]
    info_path.write_text(json.dumps(info, indent=2))
    return info


# --------------------------------------------------------------------------- 2. train


# The step count a time-only budget assumes until it has measured its pace.
UNBOUNDED_STEPS = 100_000


class StepBudget:
    """How many optimizer steps a run will get: fixed `steps`, or what `minutes` of wall time
    allow at the pace measured so far (whichever is fewer).

    The learning-rate schedule reads `total()` at every step, so a cosine decay ends when the
    time runs out on any machine instead of at a guessed step count.
    """

    def __init__(self, steps: Optional[int], minutes: Optional[float], start: float):
        self.steps, self.budget_s, self.start = steps, None if minutes is None else minutes * 60.0, start
        self.pace: Optional[float] = None  # seconds per step, measured
        self._fallback = steps or UNBOUNDED_STEPS

    def observe(self, step: int, now: float) -> None:
        if step >= 10:  # the first steps include one-off start-up costs
            self.pace = (now - self.start) / step

    def total(self) -> int:
        if self.budget_s is None or self.pace is None:
            return self._fallback
        by_time = int(self.budget_s / self.pace)
        return max(1, min(by_time, self.steps) if self.steps else by_time)

    def done(self, step: int, now: float) -> bool:
        return (self.steps is not None and step >= self.steps) or \
            (self.budget_s is not None and now - self.start >= self.budget_s)


def follow_budget(engine, tr, budget: StepBudget) -> None:
    """Make the engine's lr schedule span budget.total() steps (re-read at every step)."""
    from imagen_ds.training.optim import lr_factor

    sched = engine.lr_scheduler
    sched.lr_lambdas = [lambda step: lr_factor(step, tr.warmup_steps, tr.lr_schedule, budget.total())
                        for _ in sched.lr_lambdas]


def train(cfg: ImagenConfig, shards: Path, run_dir: Path, *, minutes: Optional[float], steps: Optional[int],
          seed: int) -> tuple[dict, torch.nn.Module, torch.nn.Module]:
    """Train until `minutes` of wall time or `steps` optimizer steps, whichever comes first.

    Returns (stats, EMA network, raw network), both fp32 copies in eval mode on CPU.
    """
    from tqdm import tqdm

    from imagen_ds.data import make_train_loader
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.models import build_model
    from imagen_ds.training import checkpoint as ckpt
    from imagen_ds.training.dist_env import init_distributed, setup_env
    from imagen_ds.training.ema import EMA
    from imagen_ds.training.engine import build_engine, train_step
    from imagen_ds.training.run_info import write_run_info

    _quiet_deepspeed()
    env = setup_env()
    print("[2/4] train: starting DeepSpeed (the first run compiles a small op, ~40 s)")
    init_distributed(env)
    _quiet_deepspeed()
    tr = cfg.training

    ckpt.seed_everything(seed)
    built = build_engine(cfg, steps=steps or UNBOUNDED_STEPS, seed=seed)  # follow_budget re-spans it
    cfg, engine = built.cfg, built.engine
    ema = EMA(engine.module, tr.ema_decay, tr.ema_warmup)
    write_run_info(run_dir, cfg, built.ds_config, seed=seed, world_size=env.world_size, launcher=env.launcher,
                   optimizer=built.optimizer_name, resumed_from=None,
                   extra={"demo": True, "minutes": minutes, "steps": steps})
    loader = make_train_loader(cfg, str(shards), micro_batch=tr.micro_batch, seed=seed)
    batches = iter(loader)
    diffusion = build_diffusion(cfg)

    metrics_path = run_dir / "metrics.jsonl"
    metrics_path.write_text("")
    step, loss_acc, n_acc, last_loss, skipped = 0, 0.0, 0, float("nan"), 0
    t0 = time.perf_counter()
    budget = StepBudget(steps, minutes, t0)
    bar = tqdm(total=steps if steps is not None else int(budget.budget_s), unit="step" if steps is not None else "s",
               desc="train", dynamic_ncols=True)
    follow_budget(engine, tr, budget)  # the lr decays over the steps the budget will allow
    while True:
        res = train_step(built, diffusion, batches)
        step += 1
        if res.applied:
            ema.update(engine.module)
        else:
            skipped += 1
        loss_acc += float(res.loss)
        n_acc += 1
        now = time.perf_counter()
        budget.observe(step, now)
        elapsed = now - t0
        if step % tr.log_every == 0:
            last_loss = loss_acc / n_acc
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": last_loss, "lr": engine.get_lr()[0],
                                    "samples_seen": step * tr.global_batch, "elapsed_s": elapsed}) + "\n")
            bar.set_postfix(step=step, loss=f"{last_loss:.4f}", it_s=f"{step / elapsed:.2f}")
            loss_acc, n_acc = 0.0, 0
        bar.n = step if steps is not None else min(int(elapsed), int(budget.budget_s))
        bar.refresh()
        if budget.done(step, now):
            break
    bar.close()
    train_s = time.perf_counter() - t0
    if n_acc:
        last_loss = loss_acc / n_acc

    meta = {"step": step, "samples_seen": step * tr.global_batch, "micro_batches": step * built.accumulation,
            "skipped_steps": skipped, "bad_in_row": 0, "world_size": env.world_size, "seed": seed, "steps": step,
            "config": cfg.to_dict()}
    ckpt.save(engine, run_dir / "checkpoints", meta, ema, keep_last=1)

    # fp32 copies for sampling: the engine may hold bf16 weights
    raw = build_model(cfg)
    raw.load_state_dict({k: v.float() for k, v in engine.module.state_dict().items()})
    averaged = build_model(cfg)
    averaged.load_state_dict(raw.state_dict())
    ema.copy_to(averaged)
    stats = {"steps": step, "train_minutes": train_s / 60.0, "steps_per_s": step / train_s,
             "samples_seen": step * tr.global_batch, "final_loss": last_loss,
             "precision": cfg.training.precision, "optimizer": built.optimizer_name,
             "loader_skipped": loader.skipped}
    return stats, averaged.eval(), raw.eval()


def _quiet_deepspeed() -> None:
    """DeepSpeed logs every setting at INFO; the demo's reader wants the progress bars."""
    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.WARNING)


# --------------------------------------------------------------------------- 3. sample


class TextDropped(torch.nn.Module):
    """The same network with every row's text replaced by its null embedding (unconditional)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x, noise_cond, text_emb, text_mask, lowres=None, aug_level=None, cond_drop=None):
        drop = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        return self.net(x, noise_cond, text_emb, text_mask, lowres=lowres, aug_level=aug_level, cond_drop=drop)


def sample_captions(cfg: ImagenConfig, net: torch.nn.Module, captions: list[str], *, seed: int,
                    unconditional: bool = False, guidance: Optional[float] = None,
                    steps: Optional[int] = None, desc: str = "sample") -> torch.Tensor:
    """One image per caption ([N, 3, S, S] in [-1, 1]); the same seed gives the same starting noise."""
    from imagen_ds.diffusion import build_diffusion
    from imagen_ds.text import load_encoder

    encoder = load_encoder(cfg.text.encoder)
    emb, mask = encoder.encode(captions, cfg.text.max_tokens)  # [N, T, D], [N, T]
    s = cfg.sampling
    changes = {k: v for k, v in (("guidance", guidance), ("steps", steps)) if v is not None}
    if unconditional:
        net, changes["guidance"] = TextDropped(net), 1.0  # guidance of null vs null is a no-op
    s = dataclasses.replace(s, **changes)
    generator = torch.Generator().manual_seed(seed)
    r = cfg.model.resolution
    print(f"      {desc}: {len(captions)} images, {s.sampler} {s.steps} steps, guidance {s.guidance}")
    return build_diffusion(cfg).sample(net, emb, mask, shape=(len(captions), 3, r, r), sampling=s,
                                       generator=generator, progress=True)


def autocast_for(cfg: ImagenConfig):
    """Sample in the precision the model trained in (bf16 halves the CPU time of sampling)."""
    import contextlib

    if cfg.training.precision == "bf16" and not torch.cuda.is_available():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------- 5. the grid


def _to_pil(img: torch.Tensor):
    from PIL import Image

    a = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()  # [H, W, 3]
    return Image.fromarray(a)


def save_grid(path: Path, rows: list[tuple[list[torch.Tensor], list[str], list[Optional[bool]]]],
              title: list[str]) -> None:
    """Rows of images, each with its caption written under it (green: the checker agrees)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=11)
    cols = max(len(r[0]) for r in rows)
    side = max(img.shape[-1] for r in rows for img in r[0]) * CELL
    text_h, pad, line = 30, 6, 14
    head = pad + line * len(title) + pad
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_w = max(probe.textbbox((0, 0), t, font=font)[2] for t in title)
    w = max(cols * (side + pad) + pad, title_w + 2 * pad)
    h = head + len(rows) * (side + text_h + pad) + pad
    grid = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for k, t in enumerate(title):
        draw.text((pad, pad + line * k), t, fill=(0, 0, 0), font=font)
    for i, (images, captions, verdicts) in enumerate(rows):
        y = head + i * (side + text_h + pad)
        for j, (img, cap, ok) in enumerate(zip(images, captions, verdicts)):
            x = pad + j * (side + pad)
            grid.paste(_to_pil(img).resize((side, side), Image.Resampling.NEAREST), (x, y))
            color = (0, 0, 0) if ok is None else ((0, 130, 0) if ok else (200, 0, 0))
            for k, text in enumerate(_two_lines(cap)):
                draw.text((x, y + side + 2 + 13 * k), text, fill=color, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _two_lines(caption: str) -> list[str]:
    """'a red circle on a blue background' -> ['a red circle', 'on a blue background']."""
    if " on a " in caption:
        head, tail = caption.split(" on a ", 1)
        return [head, "on a " + tail]
    return [caption]


# --------------------------------------------------------------------------- the job


def run_demo(out: str | Path = "demo_out", *, minutes: Optional[float] = 10.0, steps: Optional[int] = None,
             seed: int = 0, n_images: int = 10000, per_caption: int = 8, model: str = "demo_res_32",
             precision: str = "auto", sample_steps: Optional[int] = None,
             docs_png: Optional[str | Path] = REPO_DOCS / "demo.png", compare_raw: bool = False,
             cfg_changes: Optional[dict] = None) -> dict:
    """The whole demo. Returns (and writes to OUT/summary.json) the numbers it printed."""
    from imagen_ds.eval.alignment import alignment_scores, chance_color_accuracy

    if minutes is None and steps is None:
        raise ValueError("give a training budget: minutes and/or steps")
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = resolve_precision(load_config(model), precision)
    if cfg_changes:
        cfg = cfg.replace(**cfg_changes)

    # 1. data
    info = make_data(cfg, out / "data", n_images, seed)
    heldout = [h["caption"] for h in info["heldout"]]

    # 2. train
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a demo run starts fresh; its data is reused
    run_dir.mkdir(parents=True)
    stats, net, raw = train(cfg, out / "data", run_dir, minutes=minutes, steps=steps, seed=seed)

    # 3. sample: every held-out caption `per_caption` times, with and without the text
    print(f"[3/4] sample: {len(heldout)} held-out captions x {per_caption}")
    captions = [c for c in heldout for _ in range(per_caption)]
    t_sample = time.perf_counter()
    kw = {"seed": seed, "steps": sample_steps}
    with autocast_for(cfg):
        cond = sample_captions(cfg, net, captions, desc="with text (EMA)", **kw)
        uncond = sample_captions(cfg, net, captions, unconditional=True, desc="text dropped", **kw)
        raw_samples = sample_captions(cfg, raw, captions, desc="with text (raw weights)", **kw) if compare_raw else None
    sample_s = time.perf_counter() - t_sample

    # 4. check
    print("[4/4] check: reading colour and shape back from every image")
    scores = alignment_scores(cond, captions)
    base = alignment_scores(uncond, captions)
    raw_scores = alignment_scores(raw_samples, captions) if raw_samples is not None else None

    # 5. report
    per_caption_acc = {c: {"color": 0.0, "shape": 0.0} for c in heldout}
    for r in scores["results"]:
        per_caption_acc[r["caption"]]["color"] += r["color_ok"] / per_caption
        per_caption_acc[r["caption"]]["shape"] += r["shape_ok"] / per_caption
    summary = {
        "color_accuracy": scores["color_accuracy"],
        "shape_accuracy": scores["shape_accuracy"],
        "background_accuracy": scores["background_accuracy"],
        "uncond_color_accuracy": base["color_accuracy"],
        "uncond_shape_accuracy": base["shape_accuracy"],
        "chance_color_accuracy": chance_color_accuracy(captions),
        "raw_color_accuracy": raw_scores["color_accuracy"] if raw_scores else None,
        "raw_shape_accuracy": raw_scores["shape_accuracy"] if raw_scores else None,
        **stats,
        "sample_minutes": sample_s / 60.0,
        "total_minutes": (time.perf_counter() - t_start) / 60.0,
        "heldout_captions": heldout,
        "samples_per_caption": per_caption,
        "per_caption": per_caption_acc,
        "colors_read": scores["colors_read"],
        "uncond_colors_read": base["colors_read"],
        "sampling": dataclasses.asdict(cfg.sampling),
        "model": cfg.name,
        "train_images": info["n"],
        "seed": seed,
        "machine": machine(),
        "checkpoint": str(run_dir),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))

    shown = min(per_caption, 5)
    rows = []
    for i, c in enumerate(heldout):
        idx = list(range(i * per_caption, i * per_caption + shown))
        rows.append(([cond[k] for k in idx], [c] * shown,
                     [scores["results"][k]["color_ok"] and scores["results"][k]["shape_ok"] for k in idx]))
    dropped = [k * per_caption for k in range(min(len(heldout), shown))]  # one per caption's noise
    rows.append(([uncond[k] for k in dropped], ["(text dropped)"] * len(dropped), [None] * len(dropped)))
    title = [f"{cfg.name}: {summary['steps']} steps, {summary['train_minutes']:.1f} min on CPU. Captions never seen in training.",
             f"colour accuracy {summary['color_accuracy']:.2f}, shape {summary['shape_accuracy']:.2f}; "
             f"text dropped: colour {summary['uncond_color_accuracy']:.2f}. Green: checker agrees."]
    grid_path = out / "grid.png"
    save_grid(grid_path, rows, title)
    if docs_png is not None and Path(docs_png).parent.is_dir():
        shutil.copyfile(grid_path, docs_png)
        summary["docs_png"] = str(docs_png)

    print(format_summary(summary, out))
    return summary


def format_summary(s: dict, out: Path) -> str:
    lines = [
        "",
        "=" * 72,
        f"imagen-ds demo: {s['model']} trained {s['steps']} steps ({s['samples_seen']} images seen) "
        f"in {s['train_minutes']:.1f} min, {s['precision']}",
        f"  held-out captions ({len(s['heldout_captions'])} never seen in training, "
        f"{s['samples_per_caption']} samples each):",
        f"    colour accuracy      {s['color_accuracy']:.2f}   (goal >= 0.90)",
        f"    shape accuracy       {s['shape_accuracy']:.2f}",
        f"  text dropped (unconditional baseline):",
        f"    colour accuracy      {s['uncond_color_accuracy']:.2f}   (chance ~{s['chance_color_accuracy']:.2f})",
    ]
    if s.get("raw_color_accuracy") is not None:
        lines.append(f"  raw (non-EMA) weights: colour {s['raw_color_accuracy']:.2f}, shape {s['raw_shape_accuracy']:.2f}")
    lines += [
        f"  grid: {out / 'grid.png'}   summary: {out / 'summary.json'}   checkpoint: {s['checkpoint']}",
        f"  total {s['total_minutes']:.1f} min on {s['machine']}",
        "=" * 72,
    ]
    return "\n".join(lines)
