"""Typed configuration: one YAML per model, parsed once into frozen dataclasses.

Every section is a dataclass below; the YAML keys are exactly the field names. Unknown keys,
missing required fields, wrong types and inconsistent values stop with one `ConfigError`
line naming the file and the field (`model.base_channels`, ...). Everything else in the
package receives these objects, never raw dicts.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from imagen_ds.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "model_configs"
DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"

UNET_TYPES = ("UNet", "EfficientUNet")
# fused: self-attention whose keys/values also see the projected text tokens (Imagen F.1)
# self: self-attention only; cross: text cross-attention only (the 1024 model's levels)
# self_cross: self-attention followed by a separate text cross-attention
ATTENTION_TYPES = ("fused", "self", "cross", "self_cross")


@dataclass(frozen=True)
class ModelConfig:
    """The network. No defaults: a YAML states every architectural choice."""

    unet: str                      # "UNet" | "EfficientUNet"
    resolution: int                # output (and training crop) side in pixels
    lowres_resolution: Optional[int]  # SR models: side of the conditioning image; None = base
    in_channels: int               # image channels (3); SR adds the same again for the low-res image
    base_channels: int
    channel_mults: tuple[int, ...]
    num_res_blocks: tuple[int, ...]   # per level, same length as channel_mults
    attention_resolutions: tuple[int, ...]  # feature-map sides (px) with attention
    attention_type: str            # one of ATTENTION_TYPES
    mid_attention: bool            # attention in the middle block
    head_dim: Optional[int]        # 64-channel heads (heads = channels / head_dim) ...
    num_heads: Optional[int]       # ... or a fixed head count; exactly one is set
    cond_dim: int                  # width of the projected text tokens and pooled text vector
    dropout: float
    resblock_updown: bool          # up/down-sample inside residual blocks (BigGAN) vs conv layers
    null_text: str                 # "learned" | "zero": the embedding used when text is dropped
    checkpoint_activations: bool   # torch.utils.checkpoint per block

    @property
    def is_sr(self) -> bool:
        return self.lowres_resolution is not None

    @property
    def num_levels(self) -> int:
        return len(self.channel_mults)


@dataclass(frozen=True)
class TextConfig:
    encoder: str        # "t5-11b", "t5-v1_1-xxl", a local path, or "t5-tiny-random" (offline, tests)
    dim: int            # embedding width the encoder produces (t5-11b: 1024, t5-xxl: 4096)
    max_tokens: int     # embeddings are truncated / padded to this many tokens (128)
    precached: bool = True  # False: encode captions online in the loader (about 3-4x slower)


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0


@dataclass(frozen=True)
class DDPMConfig:
    schedule: str = "cosine"   # "cosine" | "linear" (beta 1e-4..0.02 in continuous time)
    prediction: str = "eps"    # "eps" | "v"


@dataclass(frozen=True)
class NoiseAugConfig:
    """Noise conditioning augmentation of the low-res image (SR models only).

    The level a in [0, 1] is a time of the cosine DDPM forward process, whatever the
    main scheme: z = alpha(a) x + sigma(a) eps. Training draws a ~ U(0, train_max_level).
    """

    train_max_level: float = 1.0
    sample_level: float = 0.2


@dataclass(frozen=True)
class DiffusionConfig:
    scheme: str                          # "edm" | "ddpm"
    edm: EDMConfig = field(default_factory=EDMConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    cond_drop_prob: float = 0.1          # classifier-free guidance: text dropped for this fraction
    noise_aug: NoiseAugConfig = field(default_factory=NoiseAugConfig)


@dataclass(frozen=True)
class SamplingConfig:
    sampler: str = "heun"            # "heun" | "stochastic" (EDM's) | "ancestral" | "ddim"; any scheme
    steps: int = 30
    guidance: float = 7.5
    threshold: str = "dynamic"       # "dynamic" | "static" | "none"
    threshold_percentile: float = 0.995
    s_churn: float = 0.0             # EDM stochastic sampler
    s_min: float = 0.0
    s_max: float = float("inf")
    s_noise: float = 1.0


@dataclass(frozen=True)
class DataConfig:
    min_side: int = 0                # skip images whose shorter side is below this (0: keep all)
    crop: str = "center"             # "center" | "random"
    train_crop: Optional[int] = None  # 1024 model: random crops of this side (256) + matching low-res crop
    max_skip_fraction: float = 0.05  # stop with an error past this fraction of bad samples
    shuffle_buffer: int = 1000
    workers: int = 2


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch: int                 # per GPU
    global_batch: int                # micro_batch x grad accumulation x world size
    precision: str                   # "bf16" | "fp32"
    samples: int                     # training length in samples seen
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 10000
    lr_schedule: str = "constant"    # "constant" | "cosine" (after the linear warm-up)
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ema_warmup: bool = False         # decay min(ema_decay, (1 + n) / (10 + n)) early on
    ema_on_cpu: bool = False
    zero_stage: int = 2
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0            # W&B sample grids every N steps (0: never)
    max_bad_steps: int = 5           # NaN/Inf losses in a row before the run stops


@dataclass(frozen=True)
class ImagenConfig:
    name: str
    model: ModelConfig
    text: TextConfig
    diffusion: DiffusionConfig
    training: TrainingConfig
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    description: str = ""
    source: str = field(default="<dict>", compare=False)  # where it was read from (for errors)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return _plain(d)

    def replace(self, **sections: Any) -> "ImagenConfig":
        """Copy with some fields of sections changed: replace(training={"micro_batch": 4})."""
        changes = {}
        for name, value in sections.items():
            current = getattr(self, name)
            changes[name] = dataclasses.replace(current, **value) if isinstance(value, dict) else value
        new = dataclasses.replace(self, **changes)
        validate(new)
        return new


# --------------------------------------------------------------------------- loading


def list_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if not p.is_file():
            raise ConfigError(str(p), "path", "no such config file")
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise ConfigError("--model", str(name_or_path),
                      f"unknown model; expected one of {', '.join(list_configs())} or a .yaml path")


def load_config(name_or_path: str | Path) -> ImagenConfig:
    path = resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "yaml"
        raise ConfigError(str(path), where, f"not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "<top>", "expected a mapping of sections")
    raw.setdefault("name", path.stem)
    return config_from_dict(raw, source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ImagenConfig:
    cfg = _build(ImagenConfig, raw, source, prefix="")
    cfg = dataclasses.replace(cfg, source=source)
    validate(cfg)
    return cfg


def _build(cls: type, raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(source, prefix.rstrip(".") or "<top>", f"expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(source, prefix + unknown[0], f"unknown key; expected one of {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(source, key, "missing required field")
            continue
        kwargs[name] = _coerce(hints[name], raw[name], source, key)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, source, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(source, key, f"expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, source, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(source, key, f"expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, source, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # allow 5.12e9 for sample counts
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(source, key, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


# --------------------------------------------------------------------------- validation


def _check(ok: bool, cfg: ImagenConfig, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(cfg.source, key, message)


def _one_of(cfg: ImagenConfig, key: str, value: Any, allowed: tuple) -> None:
    _check(value in allowed, cfg, key, f"expected one of {', '.join(map(str, allowed))}, got {value!r}")


def validate(cfg: ImagenConfig) -> None:
    m, t, d, tr, s, da = cfg.model, cfg.text, cfg.diffusion, cfg.training, cfg.sampling, cfg.data
    _one_of(cfg, "model.unet", m.unet, UNET_TYPES)
    _one_of(cfg, "model.attention_type", m.attention_type, ATTENTION_TYPES)
    _one_of(cfg, "model.null_text", m.null_text, ("learned", "zero"))
    _check(m.resolution > 0 and m.resolution % 2 ** (m.num_levels - 1) == 0, cfg, "model.resolution",
           f"must be divisible by 2^(levels-1) = {2 ** (m.num_levels - 1)}, got {m.resolution}")
    if m.lowres_resolution is not None:
        _check(0 < m.lowres_resolution < m.resolution, cfg, "model.lowres_resolution",
               f"must be below model.resolution ({m.resolution}), got {m.lowres_resolution}")
    _check(m.num_levels >= 1, cfg, "model.channel_mults", "needs at least one level")
    _check(len(m.num_res_blocks) == m.num_levels, cfg, "model.num_res_blocks",
           f"needs one entry per level ({m.num_levels}), got {len(m.num_res_blocks)}")
    _check(all(b >= 1 for b in m.num_res_blocks), cfg, "model.num_res_blocks", "each level needs >= 1 block")
    _check(m.base_channels % 32 == 0, cfg, "model.base_channels",
           f"must be divisible by 32 (GroupNorm groups), got {m.base_channels}")
    _check((m.head_dim is None) != (m.num_heads is None), cfg, "model.head_dim",
           "set exactly one of model.head_dim and model.num_heads (the other null)")
    if m.unet == "EfficientUNet":
        # it has no middle block and always resamples with (transposed) strided convs
        _check(not m.mid_attention, cfg, "model.mid_attention", "EfficientUNet has no middle block; set false")
        _check(not m.resblock_updown, cfg, "model.resblock_updown",
               "EfficientUNet resamples with strided convs; set false")
    # resolutions of the levels (a level's blocks run at this side)
    level_res = level_resolutions(m)
    for r in m.attention_resolutions:
        _check(r in level_res, cfg, "model.attention_resolutions",
               f"{r} px is not a level resolution; levels run at "
               f"{', '.join(map(str, sorted(set(level_res), reverse=True)))} px")
    level_channels = [m.base_channels * mult for mult in m.channel_mults]
    attn_channels = [ch for ch, r in zip(level_channels, level_res) if r in m.attention_resolutions]
    if m.unet == "EfficientUNet":
        # an UBlock's attention runs at the channels of the level above it
        ups = [m.base_channels * m.channel_mults[0]] + level_channels[:-1]
        attn_channels += [ch for ch, r in zip(ups, level_res) if r in m.attention_resolutions]
    if m.mid_attention:
        attn_channels.append(level_channels[-1])
    for ch in attn_channels:
        if m.head_dim is not None:
            _check(m.head_dim > 0 and ch % m.head_dim == 0, cfg, "model.head_dim",
                   f"{ch} attention channels are not divisible by head_dim {m.head_dim}")
        else:
            _check(m.num_heads > 0 and ch % m.num_heads == 0, cfg, "model.num_heads",
                   f"{ch} attention channels are not divisible by num_heads {m.num_heads}")
    _check(m.cond_dim > 0, cfg, "model.cond_dim", "must be positive")
    _check(all(mult >= 1 for mult in m.channel_mults), cfg, "model.channel_mults", "each multiplier must be >= 1")
    _check(0.0 <= m.dropout < 1.0, cfg, "model.dropout", f"expected 0 <= dropout < 1, got {m.dropout}")

    _check(t.dim > 0, cfg, "text.dim", "must be positive")
    _check(t.max_tokens > 0, cfg, "text.max_tokens", "must be positive")

    _one_of(cfg, "diffusion.scheme", d.scheme, ("edm", "ddpm"))
    _one_of(cfg, "diffusion.ddpm.schedule", d.ddpm.schedule, ("cosine", "linear"))
    _one_of(cfg, "diffusion.ddpm.prediction", d.ddpm.prediction, ("eps", "v"))
    _check(0.0 <= d.cond_drop_prob < 1.0, cfg, "diffusion.cond_drop_prob", "expected a fraction in [0, 1)")
    _check(0.0 < d.edm.sigma_min < d.edm.sigma_max, cfg, "diffusion.edm.sigma_min", "need 0 < sigma_min < sigma_max")
    _check(0.0 <= d.noise_aug.train_max_level <= 1.0, cfg, "diffusion.noise_aug.train_max_level", "expected [0, 1]")
    _check(0.0 <= d.noise_aug.sample_level <= 1.0, cfg, "diffusion.noise_aug.sample_level", "expected [0, 1]")

    # every sampler runs on either scheme (both are sampled in the EDM sigma parametrisation)
    _one_of(cfg, "sampling.sampler", s.sampler, ("heun", "stochastic", "ancestral", "ddim"))
    _check(s.steps >= 1, cfg, "sampling.steps", "must be >= 1")
    _one_of(cfg, "sampling.threshold", s.threshold, ("dynamic", "static", "none"))
    _check(0.5 <= s.threshold_percentile <= 1.0, cfg, "sampling.threshold_percentile",
           f"expected a fraction like 0.995, got {s.threshold_percentile}")

    _one_of(cfg, "data.crop", da.crop, ("center", "random"))
    if da.train_crop is not None:
        _check(m.is_sr, cfg, "data.train_crop", "only super-resolution models train on crops")
        _check(da.train_crop <= m.resolution and da.train_crop * m.lowres_resolution % m.resolution == 0,
               cfg, "data.train_crop", "must be <= model.resolution and map to whole low-res pixels")
    _check(0.0 <= da.max_skip_fraction <= 1.0, cfg, "data.max_skip_fraction", "expected [0, 1]")

    _one_of(cfg, "training.precision", tr.precision, ("bf16", "fp32"))
    _one_of(cfg, "training.lr_schedule", tr.lr_schedule, ("constant", "cosine"))
    _one_of(cfg, "training.zero_stage", tr.zero_stage, (0, 1, 2, 3))
    _check(tr.micro_batch >= 1, cfg, "training.micro_batch", "must be >= 1")
    _check(tr.global_batch % tr.micro_batch == 0, cfg, "training.global_batch",
           f"{tr.global_batch} is not a multiple of training.micro_batch {tr.micro_batch}")
    _check(0.0 <= tr.ema_decay < 1.0, cfg, "training.ema_decay", "expected [0, 1)")


def level_resolutions(m: ModelConfig) -> list[int]:
    """Side of the feature maps each level's blocks run at.

    UNet: level i at resolution / 2^i (it down-samples after a level's blocks).
    EfficientUNet: every level but the deepest down-samples FIRST (paper B.1, NeMo), so
    level i runs at resolution / 2^min(i + 1, L - 1).
    """
    if m.unet == "EfficientUNet":
        return [m.resolution // 2 ** min(i + 1, m.num_levels - 1) for i in range(m.num_levels)]
    return [m.resolution // 2 ** i for i in range(m.num_levels)]


_level_resolutions = level_resolutions  # the older private name


def _plain(obj: Any) -> Any:
    """dataclasses.asdict output -> YAML/JSON-safe (tuples as lists)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def ds_config_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".json":
        if not p.is_file():
            raise ConfigError(str(p), "--ds-config", "no such DeepSpeed config file")
        return p
    candidate = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not candidate.is_file():
        raise ConfigError("--ds-config", str(name_or_path),
                          f"unknown DeepSpeed config; expected a .json path or one of "
                          f"{', '.join(sorted(q.stem for q in DS_CONFIG_DIR.glob('*.json')))}")
    return candidate
