"""Generation by repeated full forwards (dsv4train/inference/full_forward.py), the reference of the KV-cache engine:
it equals the obvious one-prompt argmax loop, a prompt's continuation does not depend on the batch it is in (right
padding under causal attention), it stops at EOS and at max_new_tokens / max_seq_len, it refuses prompts that do not
fit before any forward, and seeded sampling is reproducible, independent of the batch and draws from
softmax(logits / T)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsv4train.inference.full_forward import generate_full_forward
from dsv4train.models.model import DSV4Model
from dsv4train.testing.toy_configs import tiny_config

EOS = 1
VOCAB = 300


def _model(mode: str, **overrides) -> DSV4Model:
    model = DSV4Model(tiny_config(vocab_size=VOCAB, max_seq_len=72, **overrides))
    model.init_weights(0)
    model.set_indexer_mode(mode)
    return model


@pytest.fixture(scope="module")
def dense_model() -> DSV4Model:
    return _model("dense")


@pytest.fixture(scope="module")
def sparse_model() -> DSV4Model:
    # 8 index heads, not the tiny config's 2: an entry's index score is exactly 0 when every head's ReLU is, which
    # with 2 heads is common, and torch.topk breaks such ties differently for rows of different lengths (see
    # models/indexer.py select_topk), so a padded row may then attend to another of two equally scored entries.
    # With 8 heads exact ties do not occur and the padding claim is checked on the sparse path itself.
    return _model("sparse", index_n_heads=8)


def _prompts(lengths, seed=1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(9, VOCAB, (n,), generator=g).tolist() for n in lengths]


def argmax_loop(model: nn.Module, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """The obvious reference: one prompt, no batch, no padding, the whole sequence forwarded for every token."""
    sequence, generated = list(prompt), []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([sequence]))[0, -1]
            token = int(torch.argmax(logits))
            generated.append(token)
            sequence.append(token)
            if token == eos_id:
                break
    return generated


class ScriptedLM(nn.Module):
    """A causal "model" whose next token after `prompt + script[:j]` is `script[j]` (then EOS), for each scripted
    prompt: logits are 0 with 10 at that token. It records what the generator did to it."""

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], max_seq_len=64, vocab=VOCAB):
        super().__init__()
        self.scripts, self.vocab = scripts, vocab
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)
        self.calls: list[tuple[tuple[int, int], bool, bool]] = []  # (shape, training, grad enabled)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append((tuple(input_ids.shape), self.training, torch.is_grad_enabled()))
        B, L = input_ids.shape
        logits = torch.zeros(B, L, self.vocab)
        for b in range(B):
            row = input_ids[b].tolist()
            prompt = next((p for p in self.scripts if tuple(row[: len(p)]) == p), None)
            if prompt is None:
                raise KeyError(f"no script for a row starting {row[:8]}")
            script = self.scripts[prompt]
            for t in range(len(prompt) - 1, L):
                j = t + 1 - len(prompt)
                logits[b, t, script[j] if j < len(script) else EOS] = 10.0
        return logits


class FixedLM(nn.Module):
    """A "model" whose next-token logits are always `logits_V`, at every position."""

    def __init__(self, logits_V: torch.Tensor, max_seq_len=4096):
        super().__init__()
        self.logits_V = logits_V
        self.cfg = SimpleNamespace(max_seq_len=max_seq_len)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits_V.expand(*input_ids.shape, -1).clone()


# ---------------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_greedy_equals_the_one_prompt_argmax_loop(mode, dense_model, sparse_model):
    model = dense_model if mode == "dense" else sparse_model
    for prompt in _prompts((13, 1)):
        # 30 new tokens from 13 cross the window (8), CSA (4) and HCA (8) block boundaries several times
        assert generate_full_forward(model, [prompt], 30, EOS, progress=False) == [argmax_loop(model, prompt, 30, EOS)]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_padding_never_reaches_a_rows_real_positions(mode, dense_model, sparse_model):
    """The claim the batching rests on, at the logits: a row padded on the right next to longer and shorter rows
    gives the logits it gives alone at every real position (fp32; different matrix shapes may change the
    summation order, hence the 1e-5 relative tolerance rather than equality)."""
    model = dense_model if mode == "dense" else sparse_model
    prompts = _prompts((21, 3, 40, 9))
    batch = torch.full((len(prompts), 40), EOS, dtype=torch.long)
    for b, p in enumerate(prompts):
        batch[b, : len(p)] = torch.tensor(p)
    with torch.no_grad():
        together = model(batch)
        for b, p in enumerate(prompts):
            alone = model(torch.tensor([p]))[0]
            torch.testing.assert_close(together[b, : len(p)], alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_a_prompts_continuation_does_not_depend_on_its_batch(mode, dense_model, sparse_model):
    model = dense_model if mode == "dense" else sparse_model
    prompts = _prompts((17, 4, 33, 1, 9))
    alone = [argmax_loop(model, p, 20, EOS) for p in prompts]
    for batch_size in (5, 2):  # one batch of all; pairs of neighbours in length order with a lone last one
        assert generate_full_forward(model, prompts, 20, EOS, batch_size=batch_size, progress=False) == alone


def test_rows_come_back_in_the_order_given_and_finished_rows_leave_the_batch():
    scripts = {(10, 11, 12): [20, 21, 22, EOS], (13,): [23, EOS], (14, 15): [24, 25, 26, 27, 28, 29]}
    model = ScriptedLM(scripts)
    prompts = [list(p) for p in scripts]
    out = generate_full_forward(model, prompts, 6, EOS, batch_size=3, progress=False)
    assert out == [[20, 21, 22, EOS], [23, EOS], [24, 25, 26, 27, 28, 29]]
    # step 1 and 2 run all three rows; (13,) is done after 2 tokens, (10, 11, 12) after 4, (14, 15) runs to 6
    assert [shape[0] for shape, _, _ in model.calls] == [3, 3, 2, 2, 1, 1]
    # L is the longest real row still there: 3, 3+1, 3+2, 3+3, then (14, 15) alone: 2+4, 2+5
    assert [shape[1] for shape, _, _ in model.calls] == [3, 4, 5, 6, 6, 7]


# ---------------------------------------------------------------------------------------------------- limits
def test_stops_at_eos_and_keeps_it():
    model = ScriptedLM({(5, 6): [30, 31, EOS, 32, 33]})
    assert generate_full_forward(model, [[5, 6]], 10, EOS, progress=False) == [[30, 31, EOS]]


def test_eos_id_is_whatever_the_caller_names():
    model = ScriptedLM({(5, 6): [30, 31, 32, 33]})
    assert generate_full_forward(model, [[5, 6]], 10, eos_id=32, progress=False) == [[30, 31, 32]]


def test_max_new_tokens_is_respected():
    model = ScriptedLM({(5,): list(range(40, 60))})
    assert generate_full_forward(model, [[5]], 7, EOS, progress=False) == [list(range(40, 47))]
    assert len(model.calls) == 7  # one forward per new token, none after the last


def test_a_row_stops_at_max_seq_len_without_eos():
    model = ScriptedLM({tuple(range(10, 19)): list(range(40, 60))}, max_seq_len=12)  # 9-token prompt, 3 free
    assert generate_full_forward(model, [list(range(10, 19))], 50, EOS, progress=False) == [[40, 41, 42]]
    assert max(shape[1] for shape, _, _ in model.calls) <= 12


def test_prompts_that_do_not_fit_are_refused_before_any_forward():
    model = ScriptedLM({(5,): [40]}, max_seq_len=12)
    ok, too_long = [5], list(range(10, 22))  # 12 tokens: no room for one new token
    with pytest.raises(ValueError, match=r"prompt 1 has 12 tokens.*max_seq_len is 12.*at most 11"):
        generate_full_forward(model, [ok, too_long], 4, EOS, progress=False)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        generate_full_forward(model, [[]], 4, EOS, progress=False)
    assert model.calls == []
    # 11 tokens fit and get exactly one
    model11 = ScriptedLM({tuple(range(10, 21)): [40, 41]}, max_seq_len=12)
    assert generate_full_forward(model11, [list(range(10, 21))], 4, EOS, progress=False) == [[40]]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"batch_size": 0}, "batch_size"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"request_seeds": [1, 2]}, "request_seeds"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    model = ScriptedLM({(5,): [40]})
    args = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(ValueError, match=message):
        generate_full_forward(model, [[5]], eos_id=EOS, progress=False, **args)
    assert model.calls == []


def test_runs_in_eval_mode_without_grad_and_restores_the_mode():
    model = ScriptedLM({(5,): [40, EOS]})
    model.train()
    generate_full_forward(model, [[5]], 4, EOS, progress=False)
    assert {(training, grad) for _, training, grad in model.calls} == {(False, False)}
    assert model.training


# ---------------------------------------------------------------------------------------------------- sampling
def test_seeded_sampling_is_reproducible_and_batch_independent(sparse_model):
    prompts = _prompts((14, 3, 26))
    kw = {"temperature": 1.0, "seed": 7, "progress": False}
    first = generate_full_forward(sparse_model, prompts, 12, EOS, batch_size=3, **kw)
    assert generate_full_forward(sparse_model, prompts, 12, EOS, batch_size=3, **kw) == first
    assert generate_full_forward(sparse_model, prompts, 12, EOS, batch_size=1, **kw) == first
    # request 0 alone (same index, so the same seed) draws what it drew next to the others
    assert generate_full_forward(sparse_model, prompts[:1], 12, EOS, **kw) == first[:1]
    # explicit per-request seeds follow the request, not its place in the list
    seeds = [11, 22, 33]
    mixed = generate_full_forward(sparse_model, prompts, 12, EOS, request_seeds=seeds, **kw)
    reordered = generate_full_forward(sparse_model, prompts[::-1], 12, EOS, request_seeds=seeds[::-1], **kw)
    assert reordered == mixed[::-1]
    # and the draws are draws: another seed gives other tokens for this near-uniform random model
    assert generate_full_forward(sparse_model, prompts, 12, EOS, **{**kw, "seed": 8}) != first


def test_sampling_draws_from_softmax_of_logits_over_temperature():
    """Fixed logits log([0.6, 0.3, 0.1]) over tokens 2, 3, 4 (EOS 1 has probability 0): at T=1 the frequencies are
    those; at T=0.5 they are p² renormalised = [36, 9, 1] / 46 (hand-computed). 4000 draws: 4 sigma of a binomial
    at p <= 0.8 is under 0.03."""
    logits_V = torch.full((6,), float("-inf"))
    logits_V[2:5] = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    model = FixedLM(logits_V)
    for temperature, expected in ((1.0, [0.6, 0.3, 0.1]), (0.5, [36 / 46, 9 / 46, 1 / 46])):
        out = generate_full_forward(model, [[2]] * 40, 100, EOS, temperature=temperature, batch_size=40, progress=False)
        tokens = torch.tensor([t for row in out for t in row])
        assert len(tokens) == 4000
        freq = [(tokens == t).float().mean().item() for t in (2, 3, 4)]
        assert freq == pytest.approx(expected, abs=0.03)


def test_greedy_takes_the_argmax():
    logits_V = torch.tensor([0.0, -5.0, 1.0, 1.2, 0.9])  # token 3 wins by a small margin
    out = generate_full_forward(FixedLM(logits_V), [[0], [2, 2]], 5, EOS, progress=False)
    assert out == [[3] * 5, [3] * 5]
