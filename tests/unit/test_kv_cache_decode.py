"""Generation through DeepSeek-V4's hybrid KV cache (models/kv_cache.py, `model(ids, cache=step)`) gives what one
full forward over the whole sequence gives, teacher-forced: prompts of different lengths prefilled together into
slots that are neither contiguous nor in order, then the true next tokens fed one per step, for every layer type,
hash layers, hc_mult != 4, sparse (top-k over the entries seen so far) and dense indexer modes. The prompt lengths
end just before, on and after the window (8), CSA block (4) and HCA block (8) boundaries of the tiny config, and
decoding crosses each of them several times. Also: a prefill of the whole sequence, a slot reused after a longer
sequence, a cache filled to its max_len from a one-token prompt, and the experts each token was routed to.

The reference is the model's ordinary `model(ids_BS)` (what training runs), never the cache path itself."""

import pytest
import torch

from dsv4train.models.kv_cache import CacheStep, allocate_layer_caches
from dsv4train.models.model import DSV4Model
from dsv4train.testing.sensitive_models import SENSITIVE_INIT, sensitive_model
from dsv4train.testing.toy_configs import TIE_FREE_INDEX_HEADS, tiny_config

MAX_LEN = 48  # the model's max_seq_len and the cache's: 12 CSA entries, 6 HCA entries per slot
TOTAL = 40  # tokens per teacher-forced sequence
# 1, then around the CSA (4), window and HCA (8) boundaries, and the second window / HCA block (16)
PROMPT_LENGTHS = (1, 3, 4, 5, 7, 8, 9, 15, 16, 17)
N_SLOTS = 13
SLOTS = (10, 0, 6, 3, 12, 8, 1, 5, 2, 11)  # not contiguous (4, 7, 9 unused), not in order
MIXED = ("swa", "csa", "hca", "csa")

# The cache path computes the same maths in another order (ring order of the window keys, one query's einsum in
# place of the [S, S] attention, the entries pooled one block at a time), through 4 layers and the mHC streams: fp32
# rounding (eps 1.2e-7) amplified by the layers. Measured <= ~2.5e-6; a wrong key, mask or entry moves the logits of
# these large-weight models by 1e-3 or more.
REL_TOL = 1e-5

CONFIGS = {
    "swa": (("swa", "swa"), {}, "sparse"),
    "csa-sparse": (("csa", "csa"), {}, "sparse"),  # 2 index heads: exact score ties (all ReLUs 0) happen
    "csa-sparse-tie-free": (("csa", "csa"), {"index_n_heads": TIE_FREE_INDEX_HEADS}, "sparse"),
    "csa-dense": (("csa", "csa"), {}, "dense"),
    "hca": (("hca", "hca"), {}, "sparse"),
    "mixed-hash1": (MIXED, {"n_hash_layers": 1}, "sparse"),
    "mixed-hash2": (MIXED, {"n_hash_layers": 2}, "sparse"),
    "mixed-hc2": (MIXED, {"hc_mult": 2}, "sparse"),
    "mixed-dense": (MIXED, {}, "dense"),
    "mixed-tie-free": (MIXED, {"index_n_heads": TIE_FREE_INDEX_HEADS}, "sparse"),
}
_MODELS: dict[str, DSV4Model] = {}


def model_for(name: str) -> DSV4Model:
    """A random model whose attention matters (shared by the tests of this module).

    init_std 0.15 / hc_init_std 0.2 instead of the training init's 0.006 / 0.02: with those, changing token 0 moves
    the last logits by ~20%, so a key or entry taken from the wrong place shows. Every tensor the init sets to a
    constant (sinks, the compressors' position biases, norms, mHC base/scale, router biases) is perturbed, so the
    sink and a position bias taken at the wrong place in its block show too."""
    if name not in _MODELS:
        layer_types, overrides, mode = CONFIGS[name]
        model = sensitive_model(tiny_config(layer_types, max_seq_len=MAX_LEN, **SENSITIVE_INIT, **overrides))
        model.set_indexer_mode(mode)
        _MODELS[name] = model
    return _MODELS[name]


def sequences(n: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 300, (n, length), generator=torch.Generator().manual_seed(seed))


def caches(model: DSV4Model, garbage_seed: int | None = 0):
    """Every layer's cache for N_SLOTS slots of MAX_LEN tokens, filled with large random values (what a slot holds
    from earlier sequences) unless `garbage_seed` is None: no place the rules say is hidden may be read."""
    layers = allocate_layer_caches(model, N_SLOTS, MAX_LEN, torch.float32, torch.device("cpu"))
    if garbage_seed is not None:
        gen = torch.Generator().manual_seed(garbage_seed)
        for layer in layers:
            for t in layer.tensors():
                t.copy_(10 * torch.randn(t.shape, generator=gen))
    return layers


def full_forward(model: DSV4Model, ids_RT: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(logits [R, T, V], each layer's experts [R, T, k]) of the ordinary forward, the routes read from the blocks'
    MoEAux (`run_layers` is the forward's own loop; `model(ids, with_aux=True)` returns only the expert counts)."""
    with torch.no_grad():
        logits = model(ids_RT)
        _, auxes = model.run_layers(model.embed_streams(ids_RT), ids_RT, model.layers)
    return logits, [a.moe.routes_BSK for a in auxes]


def cached(model, layers, ids_RT, lengths, slots, until=None):
    """Teacher-forced generation through the cache: row r's first lengths[r] tokens prefilled (right-padded rows of
    one forward), then its tokens at lengths[r], ..., until - 1 fed one per decode step, each step running only
    the rows not yet done. Returns logits [R, until, V] and each layer's experts [R, until, k]: at the prompt's
    positions from the prefill, after it from the decode step that fed the token."""
    R, T = ids_RT.shape
    until = T if until is None else until
    n_layers, k = len(model.layers), model.cfg.n_activated_experts
    logits = torch.full((R, until, model.cfg.vocab_size), float("nan"))
    routes = torch.full((n_layers, R, until, k), -1, dtype=torch.long)
    L = max(lengths)
    prompt_RL = torch.zeros(R, L, dtype=torch.long)  # padded with token 0: real tokens never see it
    for r, n in enumerate(lengths):
        prompt_RL[r, :n] = ids_RT[r, :n]
    with torch.no_grad():
        step = CacheStep(layers, torch.tensor(slots), lengths_R=torch.tensor(lengths), all_logits=True)
        out = model(prompt_RL, cache=step)
        assert len(step.routes) == n_layers
        for r, n in enumerate(lengths):
            logits[r, :n] = out[r, :n]
            for i in range(n_layers):
                routes[i, r, :n] = step.routes[i][r, :n]
        for offset in range(until - min(lengths)):
            rows = [r for r, n in enumerate(lengths) if n + offset < until]
            positions = torch.tensor([lengths[r] + offset for r in rows])
            tokens_R1 = ids_RT[rows, positions].view(-1, 1)
            step = CacheStep(layers, torch.tensor([slots[r] for r in rows]), positions_R=positions)
            out = model(tokens_R1, cache=step)
            assert out.shape == (len(rows), 1, model.cfg.vocab_size)
            logits[rows, positions] = out[:, 0]
            for i in range(n_layers):
                routes[i, rows, positions] = step.routes[i][:, 0]
    return logits, routes


def assert_close_per_position(got_RTV: torch.Tensor, want_RTV: torch.Tensor) -> None:
    """Relative L2 error of each position's logits <= REL_TOL; the message names the worst (row, position)."""
    rel_RT = (got_RTV - want_RTV).norm(dim=-1) / want_RTV.norm(dim=-1)
    rel_RT = torch.nan_to_num(rel_RT, nan=float("inf"))  # a position nobody wrote (NaN) fails too
    worst = int(rel_RT.argmax())
    r, t = divmod(worst, rel_RT.shape[1])
    assert rel_RT.max() <= REL_TOL, f"row {r} position {t}: relative error {rel_RT.max():.3g} > {REL_TOL}"


# ------------------------------------------------------------------------------------------------ teacher forcing
@pytest.mark.parametrize("name", list(CONFIGS))
def test_teacher_forced_decoding_equals_the_full_forward(name):
    model = model_for(name)
    ids_RT = sequences(len(PROMPT_LENGTHS), TOTAL, seed=3)
    want, _ = full_forward(model, ids_RT)
    got, _ = cached(model, caches(model), ids_RT, PROMPT_LENGTHS, SLOTS)
    assert_close_per_position(got, want)


@pytest.mark.parametrize("name", ["mixed-hash1", "mixed-hc2"])
def test_prefill_of_the_whole_sequence_equals_the_full_forward(name):
    """Whole sequences prefilled at once next to shorter rows (padding on the right of those), logits at every
    position; then the cache carries on to MAX_LEN from what that prefill left in it."""
    model = model_for(name)
    ids_RT = sequences(4, MAX_LEN, seed=4)
    lengths = (TOTAL, 11, TOTAL, 24)
    want, _ = full_forward(model, ids_RT)
    got, _ = cached(model, caches(model), ids_RT, lengths, (7, 1, 3, 12))
    assert_close_per_position(got[[0, 2], :TOTAL], want[[0, 2], :TOTAL])  # the prefill alone
    assert_close_per_position(got, want)


@pytest.mark.parametrize("name", ["mixed-hash1", "csa-sparse", "hca"])
def test_a_reused_slot_carries_nothing_of_its_previous_sequence(name):
    """Slots 2 and 5 first run longer sequences to the end of the cache (every ring place, entry and indexer key
    written), then take short prompts: their logits equal the full forward's of the new sequences alone. The
    caches start zeroed here, so what could leak is real state of the earlier sequences."""
    model = model_for(name)
    layers = caches(model, garbage_seed=None)
    before = sequences(2, MAX_LEN, seed=5)
    cached(model, layers, before, (MAX_LEN - 3, 6), (2, 5))
    after = sequences(2, TOTAL, seed=6)
    want, _ = full_forward(model, after)
    got, _ = cached(model, layers, after, (5, 1), (5, 2))
    assert_close_per_position(got, want)


@pytest.mark.parametrize("name", ["mixed-hash1", "mixed-hc2"])
def test_decoding_from_a_one_token_prompt_fills_the_cache_to_max_len(name):
    """Every position 1 ... MAX_LEN - 1 decoded: the last CSA and HCA entries of the slot (index MAX_LEN/m - 1)
    are written by the last token and the window ring wraps MAX_LEN/8 times."""
    model = model_for(name)
    ids_RT = sequences(1, MAX_LEN, seed=7)
    want, _ = full_forward(model, ids_RT)
    got, _ = cached(model, caches(model), ids_RT, (1,), (9,))
    assert_close_per_position(got, want)


def _last_places(n: int, ring: int) -> set[int]:
    """Ring places of a row's last `ring` real positions (position p at p % ring; fewer when n < ring)."""
    return {p % ring for p in range(max(0, n - ring), n)}


def test_a_prefill_writes_only_its_rows_real_places():
    """The layout of models/kv_cache.py's docstring, checked on the tensors: after prefills of padded rows (one
    batch with 10 prompts up to 17 tokens, one with only prompts shorter than a CSA block), each row's slot holds
    new values exactly at its window places (its last W positions), its complete blocks' entries (CSA entries,
    indexer keys, HCA entries) and its compressor rings' places of its last P = 2m (CSA, indexer) or m (HCA)
    tokens; every other place, and every slot no row was prefilled into, keeps what it held. Nothing computed
    from padding is written (which, elsewhere, would only be overwritten before it becomes visible)."""
    model = model_for("mixed-hash1")
    cfg = model.cfg
    layers = caches(model)
    everything = torch.arange(N_SLOTS)

    def snapshot():
        out = []
        for layer in layers:
            parts = {"window": layer.window.read(everything).clone()}
            for kind in ("compressed", "index"):
                state = getattr(layer, kind)
                if state is not None:
                    parts[f"{kind}.entries"] = state.entries.read(everything).clone()
                    parts[f"{kind}.ring"] = torch.cat((state.block_kv_NPX, state.block_gate_NPX), -1).clone()
            out.append(parts)
        return out

    before = snapshot()
    batches = [(PROMPT_LENGTHS, SLOTS), ((2, 3), (4, 9))]  # slot 7 is never prefilled
    ids_RT = sequences(len(PROMPT_LENGTHS), 20, seed=9)
    with torch.no_grad():
        for lengths, slots in batches:
            step = CacheStep(layers, torch.tensor(slots), lengths_R=torch.tensor(lengths))
            model(ids_RT[: len(lengths), : max(lengths)], cache=step)
    after = snapshot()
    length_of_slot = {s: n for lengths, slots in batches for n, s in zip(lengths, slots)}
    for i, layer_type in enumerate(cfg.layer_types):
        m = {"csa": cfg.csa_ratio, "hca": cfg.hca_ratio}.get(layer_type)
        for name, old in before[i].items():
            new = after[i][name]
            for slot in range(N_SLOTS):
                n = length_of_slot.get(slot, 0)
                if name == "window":
                    written = _last_places(n, cfg.window_size)
                elif name.endswith("entries"):
                    written = set(range(n // m))  # index keys: CSA's ratio too
                else:
                    written = _last_places(n, old.shape[1])
                changed = {j for j in range(old.shape[1]) if not torch.equal(old[slot, j], new[slot, j])}
                assert changed == written, f"layer {i} {name} slot {slot} (prompt of {n}): wrote places {changed}"


# ------------------------------------------------------------------------------------------------ routes
@pytest.mark.parametrize("name", ["mixed-hash1", "mixed-hash2"])
def test_routes_recorded_in_the_step_equal_the_full_forwards(name):
    """step.routes holds every layer's experts in layer order, [R, S, k] (prefill: the padded prompt, decode:
    S = 1); at each real position they are the experts the full forward routes that token to, hash layers (by
    token id) and learned ones (by the hidden state, so by everything before the token) alike."""
    model = model_for(name)
    ids_RT = sequences(len(PROMPT_LENGTHS), TOTAL, seed=8)
    _, want = full_forward(model, ids_RT)
    _, got = cached(model, caches(model), ids_RT, PROMPT_LENGTHS, SLOTS)
    for i, want_RTK in enumerate(want):
        assert torch.equal(got[i], want_RTK), f"layer {i}: the cached forward routes other experts"
