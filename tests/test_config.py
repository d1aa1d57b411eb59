"""Config validation: a bad YAML stops with one line naming the file and the field."""
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from imagen_ds.cli import main
from imagen_ds.config import config_from_dict, list_configs, load_config
from imagen_ds.errors import ConfigError

SHIPPED = ["500m_res_64", "2b_res_64", "600m_res_256", "400m_res_256", "600m_res_1024",
           "tiny_res_32", "tiny_sr_64", "tiny_effsr_128", "demo_res_32"]


def write_variant(tmp_path: Path, base: str, edit) -> Path:
    raw = yaml.safe_load(Path(load_config(base).source).read_text())
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def drop_cond_dim(raw):
    del raw["model"]["cond_dim"]


def misspell_key(raw):
    raw["model"]["base_channel"] = raw["model"].pop("base_channels")


def odd_heads(raw):
    raw["model"]["head_dim"] = 48  # 64-channel levels do not split into 48-channel heads


CASES = [
    ("tiny_res_32", misspell_key, "model.base_channel", "unknown key"),
    ("tiny_res_32", drop_cond_dim, "model.cond_dim", "missing required field"),
    ("tiny_res_32", odd_heads, "model.head_dim", "not divisible"),
    ("tiny_effsr_128", lambda raw: raw["model"].update(num_heads=3, head_dim=None), "model.num_heads", "not divisible"),
    ("tiny_effsr_128", lambda raw: raw["model"].update(attention_resolutions=[8]), "model.attention_resolutions", "8 px"),
    ("tiny_effsr_128", lambda raw: raw["model"].update(mid_attention=True), "model.mid_attention", "no middle block"),
    ("tiny_res_32", lambda raw: raw["model"].update(num_res_blocks=[1, 1]), "model.num_res_blocks", "one entry per level"),
    ("tiny_res_32", lambda raw: raw["training"].update(micro_batch="four"), "training.micro_batch", "integer"),
]


@pytest.mark.parametrize("base, edit, field, words", CASES)
def test_bad_config_names_file_and_field(tmp_path, base, edit, field, words):
    path = write_variant(tmp_path, base, edit)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.source == str(path) and err.value.field == field
    assert str(path) in str(err.value) and field in str(err.value) and words in str(err.value)


def test_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ConfigError) as err:
        load_config("3b_res_64")
    assert "3b_res_64" in str(err.value) and "2b_res_64" in str(err.value)


@pytest.mark.parametrize("base, edit, field, words", CASES[:3])
def test_cli_prints_one_line_and_exits_2(tmp_path, base, edit, field, words):
    path = write_variant(tmp_path, base, edit)
    result = CliRunner().invoke(main, ["info", "--model", str(path)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output
    assert str(path) in lines[0] and field in lines[0]


def test_cli_unknown_model_exits_2_with_one_line():
    result = CliRunner().invoke(main, ["info", "--model", "3b_res_64"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "unknown model" in result.output


def test_every_shipped_config_loads_and_round_trips():
    assert set(SHIPPED) <= set(list_configs())
    for name in SHIPPED:
        cfg = load_config(name)
        assert cfg.name == name
        assert config_from_dict(cfg.to_dict()) == cfg


def test_efficient_unet_attention_sides_follow_its_down_sample_first_levels():
    # 128 px, 4 levels: the blocks run at 64, 32, 16, 16 px (not the U-Net's 128, 64, 32, 16)
    cfg = load_config("tiny_effsr_128")
    assert cfg.replace(model={"attention_resolutions": (64, 16)}).model.attention_resolutions == (64, 16)
    with pytest.raises(ConfigError, match="levels run at 64, 32, 16"):
        cfg.replace(model={"attention_resolutions": (128,)})


def test_any_sampler_goes_with_either_scheme_and_a_wrong_name_is_one_line(tmp_path):
    def to_ddpm(raw):
        raw["diffusion"]["scheme"] = "ddpm"
        raw.setdefault("sampling", {})["sampler"] = "heun"

    assert load_config(str(write_variant(tmp_path, "tiny_res_32", to_ddpm))).sampling.sampler == "heun"
    for name in ("heun", "stochastic", "ancestral", "ddim"):
        assert load_config("tiny_res_32").replace(sampling={"sampler": name}).sampling.sampler == name

    def typo(raw):
        raw.setdefault("sampling", {})["sampler"] = "heunn"

    with pytest.raises(ConfigError, match=r"sampling\.sampler.*heun, stochastic, ancestral, ddim"):
        load_config(str(write_variant(tmp_path, "tiny_res_32", typo)))
