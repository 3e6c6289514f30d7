"""Weights on disk: export loads in transformers with the same logits, transformers' own save_pretrained output
loads back bit-exactly, dsv4 folders round-trip with MTP, `dsv4 convert` refuses to overwrite, bad inputs name
the problem."""

import json
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")

import dsv4train  # noqa: E402
from dsv4train.cli.main import main as dsv4  # noqa: E402
from dsv4train.config.errors import ConfigError  # noqa: E402
from dsv4train.models.flavors import get_flavor  # noqa: E402
from dsv4train.models.hf import config_from_hf, hf_config_kwargs  # noqa: E402
from dsv4train.models.model import DSV4Model  # noqa: E402
from dsv4train.models.pretrained import save_dsv4, save_hf  # noqa: E402
from dsv4train.testing.toy_configs import TIE_FREE_INDEX_HEADS, tiny_config  # noqa: E402

CONFIGS = {
    "all-types-hc2-hash1": (["swa", "csa", "hca"], dict(hc_mult=2, n_hash_layers=1)),
    "hc3-groups4-nohash": (["hca", "csa", "swa", "csa"], dict(hc_mult=3, o_groups=4, n_hash_layers=0)),
    "hc4-noyarn-hash2": (["csa", "hca", "swa"], dict(hc_mult=4, n_hash_layers=2, original_seq_len=0)),
}


def _model(name: str, seed: int = 0) -> DSV4Model:
    layer_types, overrides = CONFIGS[name]
    model = DSV4Model(tiny_config(layer_types, indexer_mode="sparse", index_n_heads=TIE_FREE_INDEX_HEADS, **overrides))
    model.init_weights(seed)
    return model.eval()


def _ids(cfg, seq=45):
    return torch.randint(0, cfg.vocab_size, (2, seq), generator=torch.Generator().manual_seed(1))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers_with_same_logits(tmp_path, name):
    model = _model(name)
    save_hf(model, tmp_path / "hf")
    ref = transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _ids(model.cfg)
    with torch.no_grad():
        assert _rel(model(ids), ref(ids).logits) < 1e-4


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_save_pretrained_loads_back_exactly(tmp_path, name):
    model = _model(name, seed=3)
    save_hf(model, tmp_path / "hf")
    transformers.DeepseekV4ForCausalLM.from_pretrained(tmp_path / "hf").save_pretrained(tmp_path / "hf2")
    loaded = dsv4train.load_pretrained(tmp_path / "hf2")
    assert loaded.cfg.n_mtp_layers == 0
    arch = dict(n_mtp_layers=0, name=loaded.cfg.name, max_seq_len=loaded.cfg.max_seq_len)
    if not model.cfg.original_seq_len:  # YaRN off: its factor and betas are not stored and do not matter
        arch.update(rope_factor=loaded.cfg.rope_factor, beta_fast=loaded.cfg.beta_fast, beta_slow=loaded.cfg.beta_slow)
    assert replace(model.cfg, **arch) == loaded.cfg
    ids = _ids(model.cfg)
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))


def test_dsv4_folder_round_trip_keeps_mtp(tmp_path):
    model = _model("all-types-hc2-hash1", seed=5)
    save_dsv4(model, tmp_path / "ds")
    loaded = dsv4train.load_pretrained(tmp_path / "ds")
    assert loaded.cfg == model.cfg and len(loaded.mtp) == 1
    ids = _ids(model.cfg)
    with torch.no_grad():
        a, b = model(ids, with_aux=True), loaded(ids, with_aux=True)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.mtp_logits, b.mtp_logits)


def test_bf16_export_halves_the_file_and_stays_close(tmp_path):
    model = _model("all-types-hc2-hash1")
    save_hf(model, tmp_path / "fp32")
    save_hf(model, tmp_path / "bf16", dtype=torch.bfloat16)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "bf16") < 0.6 * size(tmp_path / "fp32")
    loaded = dsv4train.load_pretrained(tmp_path / "bf16")
    ids = _ids(model.cfg)
    with torch.no_grad():
        assert _rel(loaded(ids), model(ids)) < 2e-2


def test_convert_cli_round_trip_and_refuses_to_overwrite(tmp_path, capsys):
    model = _model("hc3-groups4-nohash")
    save_hf(model, tmp_path / "hf")
    assert dsv4(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ds")]) == 0
    assert dsv4(["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "hf_again")]) == 0
    ids = _ids(model.cfg)
    with torch.no_grad():
        assert torch.equal(dsv4train.load_pretrained(tmp_path / "hf_again")(ids), model(ids))

    before = (tmp_path / "ds" / "model.safetensors").read_bytes()
    assert dsv4(["convert", "from-hf", str(tmp_path / "hf"), str(tmp_path / "ds")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "ds" / "model.safetensors").read_bytes() == before
    assert dsv4(["convert", "from-hf", str(tmp_path / "ds"), str(tmp_path / "x")]) == 2
    assert "not a transformers folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_vocab_mismatch_on_load_names_the_field(tmp_path):
    model = _model("all-types-hc2-hash1")
    save_dsv4(model, tmp_path / "ds")
    with pytest.raises(ConfigError, match="model.vocab_size"):
        dsv4train.load_pretrained(tmp_path / "ds", vocab_size=model.cfg.vocab_size + 1)


def test_weights_that_do_not_match_config_json_are_refused(tmp_path):
    save_hf(_model("all-types-hc2-hash1"), tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    hf = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**hf, "hc_mult": 3}))
    with pytest.raises(ConfigError, match="do not match its config"):
        dsv4train.load_pretrained(tmp_path / "hf")
    cfg_path.write_text(
        json.dumps(
            {
                **hf,
                "num_hidden_layers": 2,
                "layer_types": hf["layer_types"][:2],
                "mlp_layer_types": hf["mlp_layer_types"][:2],
            }
        )
    )
    with pytest.raises(KeyError, match="does not use"):
        dsv4train.load_pretrained(tmp_path / "hf")
    cfg_path.write_text(json.dumps({**hf, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        dsv4train.load_pretrained(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="is not a dsv4 folder"):
        dsv4train.load_pretrained(tmp_path)


@pytest.mark.parametrize("flavor", ["flash", "pro", "small"])
def test_full_size_configs_round_trip_through_transformers_config(flavor):
    cfg = get_flavor(flavor)
    hf = transformers.DeepseekV4Config(**hf_config_kwargs(cfg)).to_dict()
    back = config_from_hf(hf)
    assert replace(cfg, name=back.name, n_mtp_layers=0, max_seq_len=back.max_seq_len) == back
