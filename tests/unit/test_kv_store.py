"""The FP8/FP4 cache storage (dsv4train/models/kv_store.py): what is read back equals quant/formats.py's fake-quant
of what was written (that module is tested against hand-made E4M3/E2M1 values), the bytes equal the arch ref's
per-entry sizes and models/flops.py's KV formula, and a decode through the FP8 cache equals a decode through a
plain cache whose stores fake-quantize on write (so the right tensors are quantised, in the right places)."""

from __future__ import annotations

import pytest
import torch

from dsv4train.models import kv_cache
from dsv4train.models.flops import index_key_bytes, kv_cache_bytes, kv_entry_bytes
from dsv4train.models.kv_cache import CacheStep, allocate_layer_caches
from dsv4train.models.kv_store import Fp4KeyStore, Fp8EntryStore, PlainStore
from dsv4train.models.model import DSV4Model
from dsv4train.quant.formats import quant_e2m1, quant_e4m3_rows_padded
from dsv4train.testing.toy_configs import tiny_config

CPU = torch.device("cpu")


def fake_fp8_entry(x_MC: torch.Tensor, rope: int) -> torch.Tensor:
    """§7.3 by composition: E4M3 with a power-of-two scale per 64 non-RoPE dims (one block when fewer), BF16 RoPE."""
    nope = x_MC.shape[-1] - rope
    return torch.cat((quant_e4m3_rows_padded(x_MC[:, :nope], min(64, nope)), x_MC[:, nope:].bfloat16().float()), -1)


def fake_fp4_key(x_MC: torch.Tensor) -> torch.Tensor:
    dim = x_MC.shape[-1]
    block = min(32, dim)
    codes, scale = quant_e2m1(x_MC, block)
    return codes * scale.repeat_interleave(block, -1)


def _write_then_read(store, x_MC: torch.Tensor) -> torch.Tensor:
    slots = torch.tensor([1, 0, 1, 2, 0])[: len(x_MC)]
    places = torch.tensor([0, 2, 1, 3, 0])[: len(x_MC)]
    store.write(slots, places, x_MC)
    back = store.read(torch.arange(3))
    return back[slots, places]


@pytest.mark.parametrize("dim, rope", [(32, 8), (512, 64), (160, 32)])
def test_fp8_entries_read_back_as_the_fake_quant(dim, rope):
    x = (
        torch.randn(5, dim, generator=torch.Generator().manual_seed(dim))
        * torch.tensor([0.01, 1, 30, 300, 5e-4])[:, None]
    )
    got = _write_then_read(Fp8EntryStore(3, 4, dim, rope, torch.float32, CPU), x)
    assert torch.equal(got, fake_fp8_entry(x, rope))
    assert not torch.equal(got, x)  # it did quantise


@pytest.mark.parametrize("dim", [16, 128, 96])
def test_fp4_keys_read_back_as_the_fake_quant(dim):
    x = (
        torch.randn(5, dim, generator=torch.Generator().manual_seed(dim))
        * torch.tensor([0.01, 1, 30, 300, 5e-4])[:, None]
    )
    assert torch.equal(_write_then_read(Fp4KeyStore(3, 4, dim, torch.float32, CPU), x), fake_fp4_key(x))


def _bytes_per_place(store) -> int:
    n_places = store.tensors()[0].shape[0] * store.tensors()[0].shape[1]
    return sum(t.numel() * t.element_size() for t in store.tensors()) // n_places


def test_bytes_per_entry_are_the_arch_refs():
    """V4-Flash dims: 448 FP8 + 64 BF16 RoPE dims + 7 scales padded to 8 = 584 B; FP4 keys of 128 dims: 64 + 4 = 68 B
    (arch ref §7.3, by hand)."""
    assert _bytes_per_place(Fp8EntryStore(2, 3, 512, 64, torch.bfloat16, CPU)) == 584
    assert _bytes_per_place(Fp4KeyStore(2, 3, 128, torch.bfloat16, CPU)) == 68
    cfg = tiny_config()
    assert _bytes_per_place(Fp8EntryStore(2, 3, cfg.head_dim, cfg.rope_head_dim, torch.float32, CPU)) == kv_entry_bytes(
        cfg
    )
    assert _bytes_per_place(Fp4KeyStore(2, 3, cfg.index_head_dim, torch.float32, CPU)) == index_key_bytes(cfg)


@pytest.mark.parametrize("layer_types", [("swa", "csa", "hca", "csa"), ("csa", "hca")])
def test_fp8_cache_bytes_equal_the_kv_formula(layer_types):
    cfg = tiny_config(layer_types, max_seq_len=64)
    model = DSV4Model(cfg)
    n_slots, max_len = 3, 64
    caches = allocate_layer_caches(model, n_slots, max_len, torch.float32, CPU, cache_dtype="fp8")
    measured = sum(t.numel() * t.element_size() for c in caches for t in c.entry_tensors())
    assert measured == n_slots * kv_cache_bytes(cfg, max_len)
    plain = allocate_layer_caches(model, n_slots, max_len, torch.float32, CPU)
    fp32 = len(layer_types) * cfg.window_size * cfg.head_dim * 4  # by hand: every value 4 bytes
    for t in layer_types:
        if t != "swa":
            fp32 += max_len // cfg.compress_ratio(t) * cfg.head_dim * 4
        if t == "csa":
            fp32 += max_len // cfg.csa_ratio * cfg.index_head_dim * 4
    assert sum(t.numel() * t.element_size() for c in plain for t in c.entry_tensors()) == n_slots * fp32


class FakeQuantStore(PlainStore):
    """A plain store that keeps the fake-quant of what it is given: the reference for the FP8 cache's plumbing."""

    def __init__(self, like: PlainStore, quantise):
        self.data, self.quantise = torch.zeros_like(like.data), quantise

    def write(self, slots_M, places_M, values_MC):
        super().write(slots_M, places_M, self.quantise(values_MC.float()))


def _fake_quant_caches(model, n_slots, max_len):
    cfg = model.cfg
    caches = allocate_layer_caches(model, n_slots, max_len, torch.float32, CPU)
    for c in caches:
        c.window = FakeQuantStore(c.window, lambda x: fake_fp8_entry(x, cfg.rope_head_dim))
        if c.compressed is not None:
            c.compressed.entries = FakeQuantStore(c.compressed.entries, lambda x: fake_fp8_entry(x, cfg.rope_head_dim))
        if c.index is not None:
            c.index.entries = FakeQuantStore(c.index.entries, fake_fp4_key)
    return caches


def _decode_logits(model, caches, seq_S, prompt: int) -> torch.Tensor:
    slots = torch.tensor([1])
    with torch.no_grad():
        model(seq_S[None, :prompt], cache=CacheStep(caches, slots, lengths_R=torch.tensor([prompt])))
        steps = [
            model(seq_S[None, t : t + 1], cache=CacheStep(caches, slots, positions_R=torch.tensor([t])))[0, 0]
            for t in range(prompt, len(seq_S))
        ]
    return torch.stack(steps)


def test_fp8_cache_decodes_as_fake_quantised_entries():
    """The FP8 cache against a plain cache holding the fake-quant of every window entry, compressed entry and
    indexer key: equal to fp32 rounding (2e-5 relative: the two paths dequantise in another order of operations;
    measured ~1e-6), while both are far from the unquantised cache (so the test sees the quantisation)."""
    cfg = tiny_config(("swa", "csa", "hca", "csa"), max_seq_len=64, index_n_heads=16, init_std=0.05)
    model = DSV4Model(cfg)
    model.init_weights(3)
    model.eval()
    seq = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    fp8 = _decode_logits(model, allocate_layer_caches(model, 2, 64, torch.float32, CPU, "fp8"), seq, 5)
    ref = _decode_logits(model, _fake_quant_caches(model, 2, 64), seq, 5)
    exact = _decode_logits(model, allocate_layer_caches(model, 2, 64, torch.float32, CPU), seq, 5)
    rel = ((fp8 - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert rel < 2e-5, rel
    assert ((exact - ref).norm(dim=-1) / ref.norm(dim=-1)).max() > 1e-3


def test_unknown_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        allocate_layer_caches(DSV4Model(tiny_config()), 1, 16, torch.float32, CPU, cache_dtype="int4")
    assert kv_cache.CACHE_DTYPES == ("model", "fp8")
