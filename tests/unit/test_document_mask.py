"""Document masking in packed rows (issue 14): `model(ids, positions=pos)` with several documents per row.

The reference for a packed row is outside the packing code: each document run alone in a row of its own with
`positions=None`, through the ordinary (already tested) path. A packed row must give every document the logits and
MTP logits it gets alone, for every layer type, in dense and sparse indexer modes, with and without MTP; changing a
document's tokens must leave every other document of the row untouched (forward and gradients); the packed forward
builds no S x S tensor; bad positions are refused with an error that names them.

Rows are laid out so that documents cross the window (16 in toy) and the compression blocks (CSA 4, HCA 16), with
lengths shorter than a block, exactly a block, one more, several windows, and documents starting at offsets that
are not multiples of the ratios."""

from __future__ import annotations

from functools import cache

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model

# Packed == alone: the same math on the same values, but the float sums run in another order (GEMMs of other
# shapes block their inner sums differently, the window softmax adds its keys in another grouping, the MoE groups
# other token sets per expert). fp32 rounding is ~6e-8 per op; after up to 4 blocks, the head and the MTP block the
# observed gap is <= 5e-7 of the largest |logit|, so the 1e-5 (relative to the largest |logit|) holds with
# room, while a leak across a boundary moves logits by ~1e-2 of that scale or more.
REL_TOL = 1e-5
# Independence: the other documents' values never enter an untouched document's computation, yet the result is not
# bitwise equal (observed <= 3e-7): the untouched rows sit at other places in the batched GEMMs (edge tiles run
# another micro-kernel) and the MoE groups other token sets per expert, so a few ulps of reordered sums remain.
INDEPENDENCE_REL_TOL = 2e-6

# Two rows of 128 tokens. Lengths 1, 3, 4, 5, 15, 16, 17, 33, 70; offsets mostly not multiples of 4 or 16.
ROWS_128 = ([3, 70, 17, 5, 33], [5, 1, 16, 15, 4, 17, 70])
# Two rows of 125 tokens (not a multiple of any ratio): a row ending in a partial block, aligned offsets too.
ROWS_125 = ([4, 16, 70, 35], [15, 1, 33, 5, 3, 17, 51])

CONFIGS = {
    "swa": dict(layer_types=("swa", "swa")),
    "csa": dict(layer_types=("csa", "csa")),
    "hca": dict(layer_types=("hca", "hca")),
    "mixed_hash": dict(layer_types=("swa", "csa", "hca", "csa"), n_hash_layers=1),
    "mixed_hc2": dict(layer_types=("hca", "csa", "swa"), n_hash_layers=1, hc_mult=2),
}


@cache
def _cached_model(overrides: tuple) -> DSV4Model:
    kw = dict(overrides)
    model = DSV4Model(get_flavor("toy", **{**kw, "layer_types": list(kw["layer_types"])}))
    model.init_weights(seed=7)
    return model


def make_model(layer_types, indexer_mode="dense", hc_mult=4, n_mtp_layers=1, n_hash_layers=0, **overrides):
    """A toy-flavored model in eval mode (cached: building and initialising it costs more than a forward)."""
    kw = dict(overrides, layer_types=tuple(layer_types), hc_mult=hc_mult, n_mtp_layers=n_mtp_layers)
    model = _cached_model(tuple(sorted({**kw, "n_hash_layers": n_hash_layers}.items())))
    model.set_indexer_mode(indexer_mode)
    return model.eval()


def document_spans(lengths: list[int]) -> list[tuple[int, int]]:
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    return [(s, s + n) for s, n in zip(starts, lengths)]


def packed_positions(rows: tuple[list[int], ...]) -> torch.Tensor:
    """[B, S]: 0..n-1 for each document of each row (written out here, not taken from the code under test)."""
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def random_ids(shape, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str) -> None:
    """max |actual - expected| <= rel * max |expected| (a norm-wise relative error: element-wise relative errors are
    meaningless on logits near zero)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, scale = (actual - expected).abs().max().item(), expected.abs().max().item()
    assert err <= rel * scale, f"{what}: max |diff| {err:.3e} > {rel:g} x max |expected| {scale:.3e}"


def run(model, ids, positions=None):
    with torch.no_grad():
        return model(ids, positions=positions, with_aux=True)


# ---- 1. a packed row gives every document the logits it gets alone ---------------------------------------------


def _cases():
    for name, kw in CONFIGS.items():
        modes = ("dense", "sparse") if "csa" in kw["layer_types"] else ("dense",)
        for mode in modes:
            for n_mtp in (0, 1):
                yield pytest.param(name, mode, n_mtp, id=f"{name}-{mode}-mtp{n_mtp}")


# Sparse mode compares top-k picks made in two layouts. Exactly tied index scores are common with toy's 2 index heads
# (a score is exactly 0 whenever every head's ReLU is: 1 in 4 entries); `torch.topk` alone would break them in an
# order that depends on where the entries sit, and select_topk's rule (ties to the earlier entry) is what makes a
# packed document pick what it picks alone. The `topk_ties` spy makes sure the rows do hold ties at the cut, so the
# rule is exercised (with `torch.topk` back in select_topk these cases go red).


@pytest.fixture
def topk_ties(monkeypatch):
    """Counts queries whose k-th and (k+1)-th best visible index scores are exactly equal (the picks are then not
    determined by the scores alone). Wraps the model's own `select_topk` without changing what it returns."""
    import dsv4train.models.attention as attention_module

    original, ties = attention_module.select_topk, []

    def counting(scores_BST, hidden, k):
        masked = scores_BST.detach().masked_fill(hidden, float("-inf"))
        if masked.shape[-1] > k:
            best = masked.topk(k + 1, dim=-1).values
            ties.append(int(((best[..., k - 1] == best[..., k]) & best[..., k].isfinite()).sum()))
        return original(scores_BST, hidden, k)

    monkeypatch.setattr(attention_module, "select_topk", counting)
    return ties


@pytest.mark.parametrize("config,mode,n_mtp", list(_cases()))
def test_packed_row_equals_each_document_alone(config, mode, n_mtp, topk_ties):
    model = make_model(n_mtp_layers=n_mtp, indexer_mode=mode, **CONFIGS[config])
    cfg = model.cfg
    for rows in (ROWS_128, ROWS_125):
        S = sum(rows[0])
        ids = random_ids((len(rows), S), cfg.vocab_size, seed=S)
        pos = packed_positions(rows)
        if mode == "sparse":  # top-k must bind: some query sees more complete entries than it may pick
            assert int(((pos + 1) // cfg.csa_ratio).max()) > cfg.index_topk
        packed = run(model, ids, pos)
        assert (packed.mtp_logits is None) == (n_mtp == 0)
        for b, row in enumerate(rows):
            for s, e in document_spans(row):
                alone = run(model, ids[b : b + 1, s:e])
                what = f"row {b} document [{s}, {e})"
                assert_rel_close(packed.logits[b : b + 1, s:e], alone.logits, REL_TOL, f"{what} logits")
                if n_mtp:
                    assert_rel_close(packed.mtp_logits[b : b + 1, s:e], alone.mtp_logits, REL_TOL, f"{what} MTP")
    if mode == "sparse":
        assert topk_ties and sum(topk_ties) > 0, "no tied index scores at the top-k cut: the tie rule goes untested"


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_one_document_per_row_equals_positions_none(mode):
    model = make_model(indexer_mode=mode, **CONFIGS["mixed_hash"])
    ids = random_ids((2, 128), model.cfg.vocab_size, seed=1)
    pos = torch.arange(128).expand(2, -1).clone()
    with_pos, without = run(model, ids, pos), run(model, ids)
    assert_rel_close(with_pos.logits, without.logits, REL_TOL, "logits")
    assert_rel_close(with_pos.mtp_logits, without.mtp_logits, REL_TOL, "MTP logits")
    with torch.no_grad():  # the plain call (no with_aux) takes positions too
        plain = model(ids, positions=pos)
    assert_rel_close(plain, without.logits, REL_TOL, "logits without aux")


# ---- 2. changing a document never changes another ----------------------------------------------------------------

INDEPENDENCE_ROW = [21, 33, 70]  # offsets 0, 21, 54: the middle document crosses blocks, the last several windows


def _changed_variants(ids_S: torch.Tensor, span: tuple[int, int], vocab: int, seed: int) -> torch.Tensor:
    """Copies of the row with document `span` changed: all its tokens at once, then one token at a time at its first
    and last positions, around the CSA/HCA block and window boundaries inside it, and at two random positions."""
    s, e = span
    gen = torch.Generator().manual_seed(seed)
    n = e - s
    singles = {0, 1, n - 1, 3, 4, 15, 16}
    singles |= set(torch.randint(0, n, (2,), generator=gen).tolist())
    variants = [ids_S.clone()]
    variants[0][s:e] = (ids_S[s:e] + 1 + torch.randint(0, vocab - 1, (n,), generator=gen)) % vocab
    for i in sorted(j for j in singles if j < n):
        v = ids_S.clone()
        v[s + i] = (v[s + i] + 1 + int(torch.randint(0, vocab - 1, (1,), generator=gen))) % vocab
        variants.append(v)
    return torch.stack(variants)


@pytest.mark.parametrize(
    "config,mode",
    [("swa", "dense"), ("csa", "dense"), ("csa", "sparse"), ("hca", "dense"), ("mixed_hash", "sparse")],
)
def test_changing_one_document_leaves_the_others_unchanged(config, mode):
    model = make_model(n_mtp_layers=1, indexer_mode=mode, **CONFIGS[config])
    vocab = model.cfg.vocab_size
    spans = document_spans(INDEPENDENCE_ROW)
    S = spans[-1][1]
    ids_S = random_ids((S,), vocab, seed=3)
    pos = packed_positions((INDEPENDENCE_ROW,))
    base = run(model, ids_S.unsqueeze(0), pos)
    for k, changed in enumerate(spans):  # the first, a middle and the last document: others before and after it
        variants = _changed_variants(ids_S, changed, vocab, seed=k)
        out = run(model, variants, pos.expand(len(variants), -1))
        for s, e in spans:
            if (s, e) == changed:
                # the changed document itself must move (else the check below could pass vacuously)
                assert not torch.allclose(out.logits[0, s:e], base.logits[0, s:e])
                continue
            for name in ("logits", "mtp_logits"):
                got, want = getattr(out, name)[:, s:e], getattr(base, name)[:, s:e].expand(len(variants), -1, -1)
                assert_rel_close(got, want, INDEPENDENCE_REL_TOL, f"{name} of [{s}, {e}) after changing {changed}")


# ---- 3. no S x S tensor on the packed path -----------------------------------------------------------------------


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def quadratic(self, S: int) -> list[tuple[str, tuple[int, ...]]]:
        """Outputs with two dimensions both >= S: an [S, S] or [B, S, S] mask or score block, or any reshaping of one
        that keeps two long axes."""
        return [(f, shape) for f, shape in self.shapes if sum(d >= S for d in shape) >= 2]


def _naive_document_mask(positions_BS: torch.Tensor) -> torch.Tensor:
    """What the model must not do: a [B, S, S] same-document mask."""
    doc_BS = (positions_BS == 0).cumsum(1)
    return doc_BS.unsqueeze(-1) == doc_BS.unsqueeze(-2)


def test_shape_recorder_catches_an_s_by_s_tensor():
    S = 64
    pos = packed_positions(([10, 30, 24],))
    for build in (lambda: _naive_document_mask(pos), lambda: torch.zeros(S, S), lambda: torch.ones(2, S * 2, 4, S)):
        with ShapeRecorder() as rec:
            build()
        assert rec.quadratic(S), "the recorder missed a quadratic tensor"
    with ShapeRecorder() as rec:
        torch.zeros(1, S, 4, S // 4)
    assert not rec.quadratic(S)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_packed_forward_and_backward_build_no_s_by_s_tensor(mode):
    S = 320
    lengths = [3, 70, 17, 5, 33, 1, 16, 15, 4, 17, 70, 5, 33, 31]
    assert sum(lengths) == S
    # Every other dimension must stay below S, so that only the sequence axes can make a tensor quadratic: the
    # vocabulary (the [B, S, V] logits) is cut to 128, and S exceeds toy's widest axis, hc_mult * dim = 256 (mHC's
    # flattened streams [B, S, N*d]).
    model = make_model(("swa", "csa", "hca", "csa"), n_hash_layers=1, vocab_size=128, max_seq_len=S, indexer_mode=mode)
    model.train()  # the indexer KL path too
    ids = random_ids((1, S), model.cfg.vocab_size, seed=5)
    pos = packed_positions((lengths,))
    with ShapeRecorder() as rec:
        out = model(ids, positions=pos, with_aux=True)
        (out.logits.square().mean() + out.mtp_logits.square().mean() + out.indexer_loss).backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    assert len(rec.shapes) > 100, "the recorder saw (almost) no ops"
    assert not rec.quadratic(S), f"tensors with two dimensions >= S={S}: {rec.quadratic(S)[:5]}"


# ---- 4. gradients stay inside their document ---------------------------------------------------------------------


def _doc_ce(logits_BSV: torch.Tensor, ids_BS: torch.Tensor, span: tuple[int, int], shift: int) -> torch.Tensor:
    """Cross-entropy of the predictions of document `span` whose targets (token t+shift) lie inside it."""
    s, e = span
    return F.cross_entropy(logits_BSV[0, s : e - shift], ids_BS[0, s + shift : e])


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_loss_of_one_document_gives_no_gradient_to_the_others(mode):
    """Two views of "doc A's embeddings": the embedding outputs at A's positions (both lookups: the input tokens and
    MTP's next tokens), and the embedding-table rows of A's tokens; each document draws its ids from its own range of
    the vocabulary, so a table row belongs to one document (this also catches a next-document token entering the
    MTP input at a document's last position, which sits at a position of the document being trained)."""
    model = make_model(CONFIGS["mixed_hash"]["layer_types"], n_hash_layers=1, indexer_mode=mode)
    spans = document_spans(INDEPENDENCE_ROW)
    share = model.cfg.vocab_size // len(spans)
    ids = torch.cat([k * share + random_ids((1, e - s), share, seed=11 + k) for k, (s, e) in enumerate(spans)], 1)
    pos = packed_positions((INDEPENDENCE_ROW,))
    embedded: list[torch.Tensor] = []

    def keep(_module, _inputs, out):
        out.retain_grad()
        embedded.append(out)

    handle = model.embed.register_forward_hook(keep)
    try:
        for target in spans[1:]:  # a middle document (others before and after) and the last one
            embedded.clear()
            model.zero_grad(set_to_none=True)
            out = model(ids, positions=pos, with_aux=True)
            s, e = target
            # the training CE, plus every output of the document: the CE never reaches the last MTP positions
            # (their targets lie past the document), where the next document's first token could enter
            loss = _doc_ce(out.logits, ids, target, 1) + _doc_ce(out.mtp_logits, ids, target, 2)
            loss = loss + out.logits[0, s:e].square().mean() + out.mtp_logits[0, s:e].square().mean()
            loss.backward()
            assert embedded, "model.embed was never called"
            views = [(f"embedding output {i} at the positions of", emb.grad[0]) for i, emb in enumerate(embedded)]
            views.append(("embedding-table rows of the tokens of", model.embed.weight.grad[ids[0]]))
            for view, g_SD in views:
                scale = g_SD[s:e].abs().max().item()
                assert scale > 0, f"no gradient reached the {view} the target document"
                for other in spans:
                    if other == target:
                        continue
                    # exactly 0 today (masked probabilities are exactly 0, so are their gradients); the same few ulps
                    # of slack as the forward check, so that a finite masking constant would pass too
                    leak = g_SD[other[0] : other[1]].abs().max().item()
                    assert leak <= INDEPENDENCE_REL_TOL * scale, (
                        f"loss of {target} reaches the {view} {other}: {leak:.3e}"
                    )
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)


# ---- 5. bad positions ---------------------------------------------------------------------------------------------

_GOOD = [0, 1, 2, 0, 1, 0, 1, 2]


def _rows(*rows):
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize(
    "positions",
    [
        pytest.param(torch.tensor(_GOOD), id="1-d"),
        pytest.param(_rows(_GOOD), id="one-row-for-two"),
        pytest.param(_rows(_GOOD + [3], _GOOD + [3]), id="too-long"),
        pytest.param(_rows(_GOOD, _GOOD).unsqueeze(-1), id="3-d"),
        pytest.param(_rows([1, 2, 3, 0, 1, 0, 1, 2], _GOOD), id="first-not-0"),
        pytest.param(_rows(_GOOD, [0, 1, 3, 4, 5, 6, 7, 8]), id="jump-by-2"),
        pytest.param(_rows(_GOOD, [0, 1, 2, 3, 1, 2, 3, 4]), id="reset-to-1"),
        pytest.param(_rows(_GOOD, [0, 1, 1, 2, 3, 4, 5, 6]), id="repeat"),
        pytest.param(_rows(_GOOD, [0, 1, 2, -1, 0, 1, 2, 3]), id="negative"),
        pytest.param(_rows([-1, 0, 1, 2, 3, 4, 5, 6], _GOOD), id="negative-first"),
        pytest.param(_rows(_GOOD, _GOOD).float(), id="float"),
    ],
)
def test_bad_positions_are_refused(positions):
    model = make_model(("swa", "csa"), n_mtp_layers=1)
    ids = random_ids((2, 8), model.cfg.vocab_size, seed=0)
    with pytest.raises(ValueError, match="positions"):
        model(ids, positions=positions)
    with pytest.raises(ValueError, match="positions"):
        model(ids, positions=positions, with_aux=True)


def test_topk_ties_go_to_the_earlier_entry():
    """Hand-written scores: 2.0 first, then the tiny positive, then the two exact zeros in index order (-0.0 ties with
    0.0), then the negatives; a hidden entry is never picked and a pick past the visible ones is -1."""
    from dsv4train.models.indexer import select_topk

    scores = torch.tensor([[[0.0, -1.5, 0.0, 2.0, -0.0, 1e-30, -1e-30, 5.0]]])
    hidden = torch.tensor([[False] * 7 + [True]])
    assert select_topk(scores, hidden, 5).tolist() == [[[3, 5, 0, 2, 4]]]
    assert select_topk(scores, hidden, 8).tolist() == [[[3, 5, 0, 2, 4, 6, 1, -1]]]
