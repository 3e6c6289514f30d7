"""Sampling for the generation engine (dsv4train/inference/sampling.py): the warpers equal transformers' and
hand-computed supports, the counter-hash noise equals a plain-Python MurmurHash3 (itself checked against published
test vectors) and is uniform, the Gumbel-max sampler draws from the processed distribution, and a row's token and
logprobs do not depend on the rest of the batch."""

import itertools
import math
import re
import struct

import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dsv4train.inference.sampling import (
    SampledTokens,
    SamplingParams,
    _unit_interval,
    gumbel_noise,
    processed_logits,
    sample,
    uniform_noise,
)

MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- plain-Python references
def murmur3_x86_32(words: list[int], seed: int = 0) -> int:
    """MurmurHash3_x86_32 of the little-endian bytes of 32-bit `words` (no tail: whole words only), with Python
    ints and explicit masking, written from the algorithm's description, not from the module."""

    def rotl(x: int, r: int) -> int:
        return ((x << r) | (x >> (32 - r))) & MASK32

    h = seed & MASK32
    for word in words:
        k = (word * 0xCC9E2D51) & MASK32
        k = rotl(k, 15)
        k = (k * 0x1B873593) & MASK32
        h = rotl(h ^ k, 13)
        h = (h * 5 + 0xE6546B64) & MASK32
    h ^= 4 * len(words)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK32
    return h ^ (h >> 16)


def f32(x: float) -> float:
    """x rounded to the nearest fp32 (struct rounds correctly), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def reference_uniform(seed: int, counter: int, v: int) -> float:
    """The documented construction: hash of the words (seed lo, seed hi, counter lo, counter hi, v), then
    u = min(fp32(fp32(h) + 1/2) * 2^-32, 1 - 2^-24)."""
    h = murmur3_x86_32([seed & MASK32, (seed >> 32) & MASK32, counter & MASK32, (counter >> 32) & MASK32, v])
    return min(f32(f32(h) + 0.5) * 2.0**-32, 1.0 - 2.0**-24)


def reference_probs(logits: list[float], temperature: float, top_k: int, top_p: float) -> list[float]:
    """float64, token by token: softmax(logits / T) restricted to the k most likely, renormalised, then the most
    likely tokens in order until their (renormalised) mass reaches top_p, renormalised again."""
    scaled = [x / temperature for x in logits]
    ranked = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    if 0 < top_k < len(scaled):
        ranked = ranked[:top_k]
    weights = {v: math.exp(scaled[v] - scaled[ranked[0]]) for v in ranked}
    total = sum(weights.values())
    kept, mass = [], 0.0
    for v in ranked:
        kept.append(v)
        mass += weights[v] / total
        if top_p < 1.0 and mass >= top_p:
            break
    kept_total = sum(weights[v] for v in kept)
    return [weights[v] / kept_total if v in kept else 0.0 for v in range(len(scaled))]


def _rows(settings: list[tuple[float, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temperature_R = torch.tensor([s[0] for s in settings], dtype=torch.float32)
    top_k_R = torch.tensor([s[1] for s in settings], dtype=torch.long)
    top_p_R = torch.tensor([s[2] for s in settings], dtype=torch.float32)
    return temperature_R, top_k_R, top_p_R


def _tie_free_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    logits_RV = 3.0 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    assert all(len(set(row.tolist())) == vocab for row in logits_RV)
    return logits_RV


# ----------------------------------------------------------------------------- warpers
SETTINGS_GRID = list(itertools.product((0.5, 1.0, 1.7), (0, 1, 3, 10, 64, 80), (0.1, 0.5, 0.9, 0.97, 1.0)))


def test_warpers_equal_transformers_per_row_in_one_call():
    """transformers' generate() chains Temperature -> TopK -> TopP (top_k = 0 and top_p = 1 skip the warper);
    min_tokens_to_keep is 1 in both (TopK keeps max(k, 1), TopP always keeps the most likely token). Its TopP keeps
    a token iff the ascending cumulative probability exceeds 1 - p, i.e. iff the tokens more likely than it hold
    less than p: the token that crosses the threshold is kept, the same nucleus as vLLM's and ours."""
    vocab = 64
    logits_RV = _tie_free_logits(len(SETTINGS_GRID), vocab, seed=0)
    got_RV = processed_logits(logits_RV, *_rows(SETTINGS_GRID))
    assert got_RV.dtype == torch.float32
    for r, (temperature, top_k, top_p) in enumerate(SETTINGS_GRID):
        scores = TemperatureLogitsWarper(temperature)(None, logits_RV[r : r + 1].clone())
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            # the comparison means something only if no nucleus boundary is within rounding of p (float64 check)
            probs = torch.softmax(scores.double(), -1).sort(descending=True).values.cumsum(-1)
            assert (probs - top_p).abs().min() > 1e-5, "pick another logits seed: a boundary sits on top_p"
            scores = TopPLogitsWarper(top_p)(None, scores)
        expected = scores[0]
        assert torch.equal(torch.isinf(got_RV[r]), torch.isinf(expected)), (r, temperature, top_k, top_p)
        finite = torch.isfinite(expected)
        assert torch.equal(got_RV[r][finite], expected[finite]), "the kept logits are the scaled logits, unchanged"


def test_top_k_top_p_and_temperature_supports_by_hand():
    # probabilities 0.55 > 0.25 > 0.12 > 0.08, put at indices 1, 3, 0, 2 so that index and rank differ
    probs = [0.12, 0.55, 0.08, 0.25]
    logits = [math.log(p) for p in probs]
    cases = {
        # (temperature, top_k, top_p): expected support, each worked out below
        (1.0, 0, 0.5): {1},  # 0.55 >= 0.5 already
        (1.0, 0, 0.7): {1, 3},  # 0.55 < 0.7, 0.55 + 0.25 = 0.80 >= 0.7
        (1.0, 0, 0.85): {1, 3, 0},  # 0.80 < 0.85, + 0.12 = 0.92
        (1.0, 0, 1.0): {0, 1, 2, 3},
        (1.0, 1, 1.0): {1},
        (1.0, 2, 1.0): {1, 3},
        (1.0, 4, 1.0): {0, 1, 2, 3},
        (1.0, 10, 1.0): {0, 1, 2, 3},  # k >= V keeps all
        # top-p on the top-k-renormalised distribution: 0.55 / 0.80 = 0.6875 >= 0.65 (unrenormalised 0.55 < 0.65)
        (1.0, 2, 0.65): {1},
        # top-p after the temperature: at T = 0.5 p^2 / sum p^2 = 0.3025 / 0.3858 = 0.784 >= 0.7 (at T = 1: {1, 3})
        (0.5, 0, 0.7): {1},
    }
    settings = list(cases)
    logits_RV = torch.tensor([logits] * len(settings))
    got_RV = processed_logits(logits_RV, *_rows(settings))
    for r, setting in enumerate(settings):
        support = {v for v in range(4) if math.isfinite(got_RV[r, v].item())}
        assert support == cases[setting], setting
        for v in support:  # the finite entries are the logits / T
            assert got_RV[r, v].item() == pytest.approx(logits[v] / setting[0], rel=1e-6)


def test_temperature_zero_keeps_only_the_first_argmax():
    logits_RV = torch.tensor([[1.0, 3.0, 3.0, 2.0], [5.0, -1.0, 5.0, 5.0], [0.0, 0.0, 0.0, 7.5]])
    greedy_R = torch.zeros(3)
    # top-k / top-p settings are ignored by greedy rows
    got_RV = processed_logits(logits_RV, greedy_R, torch.tensor([0, 2, 3]), torch.tensor([1.0, 0.3, 0.9]))
    expected_RV = torch.full((3, 4), -math.inf)
    expected_RV[0, 1], expected_RV[1, 0], expected_RV[2, 3] = 3.0, 5.0, 7.5
    assert torch.equal(got_RV, expected_RV)
    out = sample(logits_RV, greedy_R, torch.zeros(3, dtype=torch.long), torch.ones(3), torch.arange(3), torch.zeros(3))
    assert out.tokens_R.tolist() == [1, 0, 3]


# ----------------------------------------------------------------------------- noise
PUBLISHED_VECTORS = [  # MurmurHash3_x86_32 test vectors as published with SMHasher ports: (bytes, seed, hash)
    (b"", 0, 0x00000000),
    (b"", 1, 0x514E28B7),
    (b"", 0xFFFFFFFF, 0x81F16F39),
    (b"\0\0\0\0", 0, 0x2362F9DE),
    (b"aaaa", 0x9747B28C, 0x5A97808A),
]
MMH3_VECTORS = [  # mmh3 5.3.1 (a C implementation): mmh3.hash(struct.pack("<5I", *words), 0, signed=False)
    ((0, 0, 0, 0, 0), 0xEE9D294A),
    ((1, 0, 0, 0, 0), 0x62E4AE66),
    ((0, 0, 1, 0, 0), 0x82747245),
    ((0, 0, 0, 0, 1), 0x7743FE48),
    ((123456789, 0, 7, 0, 4095), 0x68CFD855),
    ((0xFFFFFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 129279), 0x7B965711),
]


@pytest.mark.parametrize(("data", "seed", "expected"), PUBLISHED_VECTORS)
def test_python_murmur_matches_published_vectors(data, seed, expected):
    assert murmur3_x86_32(list(struct.unpack(f"<{len(data) // 4}I", data)), seed) == expected


@pytest.mark.parametrize(("words", "expected"), MMH3_VECTORS)
def test_python_murmur_matches_mmh3_on_the_noise_message(words, expected):
    assert murmur3_x86_32(list(words)) == expected


def test_uniform_noise_equals_the_python_reference():
    seeds = [0, 1, 123456789, 2**63 - 1, -1, -(2**63), 2**40 + 3]
    counters = [0, 0, 7, 2**32 + 5, 3, -1, 2**62]
    vocab = 4096
    u_RV = uniform_noise(torch.tensor(seeds), torch.tensor(counters), vocab)
    assert u_RV.dtype == torch.float32 and u_RV.shape == (len(seeds), vocab)
    for r, (seed, counter) in enumerate(zip(seeds, counters)):
        for v in (0, 1, 2, 17, 1000, vocab - 1):
            assert u_RV[r, v].item() == reference_uniform(seed, counter, v), (seed, counter, v)


def test_unit_interval_is_open_at_both_ends_and_gives_finite_gumbel():
    bits = torch.tensor([0, 1, 2**24, 2**32 - 256, 2**32 - 129, 2**32 - 128, 2**32 - 1])
    u = _unit_interval(bits)
    # fp32 spacing below 2^32 is 256: h >= 2^32 - 128 rounds to 2^32, so without the clamp the last two give 1.0
    assert (u > 0).all() and (u < 1).all()
    assert u[0].item() == 2.0**-33 and u[-1].item() == 1.0 - 2.0**-24
    assert torch.isfinite(-torch.log(-torch.log1p(-u))).all()


def test_uniform_noise_is_uniform_and_streams_differ():
    rows, vocab = 250, 4000  # 1e6 values
    u_RV = uniform_noise(torch.arange(rows) // 2, torch.arange(rows) % 2, vocab).double()  # seeds x counters
    n = u_RV.numel()
    assert u_RV.min() > 0 and u_RV.max() < 1
    # 5 standard errors: the mean of U(0,1) has sd sqrt(1/12 / n); the sample variance has sd sqrt((mu4 - s^4) / n)
    # with mu4 = 1/80, s^4 = 1/144, so (mu4 - s^4) = 1/180
    assert abs(u_RV.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u_RV.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    # neighbours along v, along the counter (rows 2s, 2s+1) and along the seed (rows 2s, 2s+2) are uncorrelated:
    # a correlation of independent pairs has sd 1 / sqrt(pairs)
    for a, b in (
        (u_RV[:, :-1], u_RV[:, 1:]),
        (u_RV[0::2], u_RV[1::2]),
        (u_RV[0:-2:2], u_RV[2::2]),
    ):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(a.numel())
    assert (u_RV[0] == u_RV[1]).float().mean() < 1e-3  # a different counter is a different stream
    assert (u_RV[0] == u_RV[2]).float().mean() < 1e-3  # so is a different seed


def test_uniform_noise_is_batch_invariant():
    alone_V = uniform_noise(torch.tensor([42]), torch.tensor([9]), 300)[0]
    batch_RV = uniform_noise(torch.tensor([7, 3, 42, 42, 42]), torch.tensor([9, 9, 8, 10, 9]), 1000)
    assert torch.equal(batch_RV[4, :300], alone_V)  # another row, another batch, a longer vocabulary
    assert not torch.equal(batch_RV[2, :300], alone_V) and not torch.equal(batch_RV[3, :300], alone_V)


# ----------------------------------------------------------------------------- sampler
DISTRIBUTION_LOGITS = [1.2, -0.3, 0.4, 2.0, -1.5, 0.9]
DISTRIBUTION_SETTINGS = [(1.0, 0, 1.0), (0.6, 0, 1.0), (1.5, 3, 1.0), (1.0, 0, 0.8), (0.8, 4, 0.9)]


def test_sampler_draws_from_the_processed_distribution():
    draws = 40_000
    seed = 1234
    for temperature, top_k, top_p in DISTRIBUTION_SETTINGS:
        logits_RV = torch.tensor([DISTRIBUTION_LOGITS] * draws)
        settings = _rows([(temperature, top_k, top_p)] * draws)
        tokens_R = sample(logits_RV, *settings, torch.full((draws,), seed), torch.arange(draws)).tokens_R
        counts = torch.bincount(tokens_R, minlength=len(DISTRIBUTION_LOGITS)).tolist()
        expected = reference_probs(DISTRIBUTION_LOGITS, temperature, top_k, top_p)
        for v, (count, p) in enumerate(zip(counts, expected)):
            if p == 0.0:
                assert count == 0, (temperature, top_k, top_p, v)
                continue
            # a count is Binomial(draws, p); 5 standard deviations leave a correct sampler a ~6e-7 chance per
            # token of failing, while an error of a few percent in a probability is caught
            sd = math.sqrt(draws * p * (1 - p))
            assert abs(count - draws * p) < 5 * sd, (temperature, top_k, top_p, v, count, draws * p)


def _mixed_batch() -> tuple[torch.Tensor, tuple, torch.Tensor, torch.Tensor]:
    settings = [(1.0, 0, 1.0), (0.7, 5, 1.0), (0.0, 0, 1.0), (1.3, 0, 0.9), (0.9, 8, 0.7), (0.0, 3, 0.5)]
    logits_RV = _tie_free_logits(len(settings), 100, seed=5)
    return logits_RV, _rows(settings), torch.tensor([11, 12, 13, 14, 15, 11]), torch.tensor([0, 4, 2, 9, 1, 3])


def test_sample_is_batch_invariant():
    logits_RV, (temperature_R, top_k_R, top_p_R), seeds_R, counters_R = _mixed_batch()
    batch = sample(logits_RV, temperature_R, top_k_R, top_p_R, seeds_R, counters_R)
    assert isinstance(batch, SampledTokens) and batch.tokens_R.dtype == torch.long
    order = torch.tensor([3, 0, 5, 1, 4, 2])  # the same rows, shuffled
    shuffled = sample(*(t[order] for t in (logits_RV, temperature_R, top_k_R, top_p_R, seeds_R, counters_R)))
    for r in range(len(seeds_R)):
        one = slice(r, r + 1)
        alone = sample(logits_RV[one], temperature_R[one], top_k_R[one], top_p_R[one], seeds_R[one], counters_R[one])
        at = int((order == r).nonzero())
        for result, i in ((batch, r), (alone, 0), (shuffled, at)):
            assert result.tokens_R[i] == batch.tokens_R[r]
            # on CPU each row is reduced on its own, so the logprobs agree to the bit
            assert result.sampled_logprob_R[i] == batch.sampled_logprob_R[r]
            assert result.raw_logprob_R[i] == batch.raw_logprob_R[r]


def test_sample_logprobs_equal_a_float64_reference():
    logits_RV, (temperature_R, top_k_R, top_p_R), seeds_R, counters_R = _mixed_batch()
    out = sample(logits_RV, temperature_R, top_k_R, top_p_R, seeds_R, counters_R)
    assert out.sampled_logprob_R.dtype == torch.float32 and out.raw_logprob_R.dtype == torch.float32
    for r in range(len(seeds_R)):
        token = int(out.tokens_R[r])
        logits = logits_RV[r].double().tolist()
        raw = logits[token] - math.log(sum(math.exp(x) for x in logits))
        # fp32 log_softmax over 100 logits of size ~10: a few ulp of the logsumexp, far below 1e-5
        assert out.raw_logprob_R[r].item() == pytest.approx(raw, abs=1e-5)
        temperature, top_k, top_p = temperature_R[r].item(), int(top_k_R[r]), top_p_R[r].item()
        if temperature == 0.0:
            assert token == max(range(len(logits)), key=lambda v: logits[v])
            assert out.sampled_logprob_R[r].item() == 0.0  # a point mass
            assert out.raw_logprob_R[r].item() == pytest.approx(max(logits) - math.log(sum(map(math.exp, logits))))
            continue
        probs = reference_probs(logits, temperature, top_k, top_p)
        assert probs[token] > 0, "a token outside the support was drawn"
        assert out.sampled_logprob_R[r].item() == pytest.approx(math.log(probs[token]), abs=1e-5)


def test_greedy_rows_ignore_the_noise():
    logits_RV = torch.tensor([[0.5, 2.0, 2.0, -1.0]] * 4)
    settings = torch.zeros(4), torch.zeros(4, dtype=torch.long), torch.ones(4)
    out = sample(logits_RV, *settings, torch.tensor([0, 1, 2, 3]), torch.tensor([5, 6, 7, 8]))
    assert out.tokens_R.tolist() == [1, 1, 1, 1]
    assert out.sampled_logprob_R.tolist() == [0.0] * 4
    assert torch.allclose(out.raw_logprob_R, torch.log_softmax(logits_RV, -1)[:, 1])


def test_gumbel_noise_is_the_transform_of_uniform_noise():
    seeds_R, counters_R = torch.tensor([3, 4]), torch.tensor([0, 1])
    u_RV = uniform_noise(seeds_R, counters_R, 50).double()
    expected_RV = -torch.log(-torch.log(1 - u_RV))  # 1 - u is exact in float64 for these fp32 values
    assert torch.allclose(gumbel_noise(seeds_R, counters_R, 50).double(), expected_RV, rtol=1e-6, atol=1e-6)


def test_shape_errors_name_the_argument():
    logits_RV = torch.zeros(3, 5)
    ones, zeros = torch.ones(3), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"logits must be \[R, V\]"):
        processed_logits(torch.zeros(5), ones, zeros, ones)
    with pytest.raises(ValueError, match=r"top_k_R must have shape \[R\] = \[3\]"):
        processed_logits(logits_RV, ones, torch.zeros(2, dtype=torch.long), ones)
    with pytest.raises(ValueError, match=r"counters_R must have shape"):
        sample(logits_RV, ones, zeros, ones, zeros, torch.zeros(4, dtype=torch.long))


@pytest.mark.gpu
def test_noise_and_tokens_are_the_same_on_gpu():
    from dsv4train.utils.device import accelerator_name

    if accelerator_name() is None:
        pytest.skip("needs CUDA")
    seeds_R, counters_R = torch.tensor([0, 2**63 - 1, -5]), torch.tensor([1, 2**40, 3])
    assert torch.equal(
        uniform_noise(seeds_R, counters_R, 1000), uniform_noise(seeds_R.cuda(), counters_R.cuda(), 1000).cpu()
    )
    logits_RV, settings, seeds_R, counters_R = _mixed_batch()
    cpu = sample(logits_RV, *settings, seeds_R, counters_R)
    gpu = sample(logits_RV.cuda(), *(s.cuda() for s in settings), seeds_R.cuda(), counters_R.cuda())
    assert torch.equal(cpu.tokens_R, gpu.tokens_R.cpu())  # no near-ties in these logits
    torch.testing.assert_close(cpu.sampled_logprob_R, gpu.sampled_logprob_R.cpu())  # reductions may round differently


# ----------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", -3),
        ("max_new_tokens", 2.0),
        ("max_new_tokens", True),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", "1"),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.2),
        ("top_p", math.nan),
        ("top_k", -1),
        ("top_k", 2.0),
        ("top_k", True),
        ("stop_token_ids", (3, -1)),
        ("stop_token_ids", [1.0]),
        ("stop_token_ids", 5),
        ("stop_strings", ("ok", "")),
        ("stop_strings", "</s>"),
        ("stop_strings", (3,)),
        ("seed", 1.5),
        ("seed", None),
        ("seed", 2**63),
    ],
)
def test_sampling_params_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must .*got {re.escape(repr(value))}"):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_lists_and_greedy():
    assert SamplingParams() == SamplingParams(256, 1.0, 1.0, 0, (), (), 0)
    params = SamplingParams(temperature=0, top_p=1, stop_token_ids=[1, 2], stop_strings=["\n\n"], seed=-7)
    assert params.stop_token_ids == (1, 2) and params.stop_strings == ("\n\n",)
    assert params.greedy and not SamplingParams(temperature=1e-3).greedy
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)
    hash(params)  # frozen with tuples: usable as a key
    with pytest.raises(AttributeError):
        params.seed = 3


def test_untruncated_fast_path_equals_the_full_warpers():
    """`truncated=False` (no row uses top-k or top-p: the engine knows it on the host) skips the sort and must give
    the very same processed logits and draws, greedy rows included."""
    logits_RV = torch.randn(5, 40, generator=torch.Generator().manual_seed(3)) * 3
    temperature_R = torch.tensor([0.0, 0.5, 1.0, 1.7, 0.0])
    off_k, off_p = torch.zeros(5, dtype=torch.long), torch.ones(5)
    full = processed_logits(logits_RV, temperature_R, off_k, off_p)
    fast = processed_logits(logits_RV, temperature_R, off_k, off_p, truncated=False)
    assert torch.equal(full, fast)
    seeds_R, counters_R = torch.arange(5) * 7 + 1, torch.arange(5)
    a = sample(logits_RV, temperature_R, off_k, off_p, seeds_R, counters_R)
    b = sample(logits_RV, temperature_R, off_k, off_p, seeds_R, counters_R, truncated=False)
    assert torch.equal(a.tokens_R, b.tokens_R) and torch.equal(a.sampled_logprob_R, b.sampled_logprob_R)
