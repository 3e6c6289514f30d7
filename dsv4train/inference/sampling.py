"""Next-token sampling for the generation engine: pure functions of one decode step's logits [R, V] (R = rows
decoded this step), run on the logits' device with per-row settings, no Python loop over rows and no RNG state.

- `SamplingParams`: one request's settings, checked when built (a bad value names its field and what is allowed).
- `processed_logits`: the distribution a row is actually sampled from, as logits with -inf outside its support.
  The warpers run in the order of vLLM and transformers: divide by the temperature, then top-k (keep the k largest
  scaled logits; 0 or k >= V keeps all; a value tied with the k-th largest is kept too, as both libraries do), then
  top-p (nucleus) on the temperature-scaled, top-k-filtered distribution: keep the smallest set of the most likely
  tokens whose probability sums to >= top_p, i.e. a token is kept iff the tokens more likely than it hold less than
  top_p (the token that crosses the threshold is kept, so at least one token always is); top_p = 1 keeps all. A row
  with temperature 0 is greedy: only its argmax survives (the first index on ties, torch.argmax's rule).
- `uniform_noise`: u in (0, 1), a counter-based hash of (seed, counter, vocabulary index) (construction below).
- `sample`: Gumbel-max over the processed logits, token = argmax_v(processed_v + g_v) with g_v Gumbel(0, 1) noise
  made from `uniform_noise`; greedy rows take the argmax and ignore the noise. With the token come two logprobs:
  under the distribution actually sampled from (0 for greedy rows, a point mass) and under the model's own
  distribution (log_softmax of the raw logits, temperature 1). GRPO's importance ratio pairs the sampled one
  (π_old) with the trainer's keep-sampling logprobs (posttrain/grpo/masks.py: the same temperature and support);
  the raw one is what a full-vocabulary comparison with the trainer (distillation, the keep-routing gap) uses.

Why Gumbel-max with a counter hash. argmax(l + g) with independent Gumbel g is an exact draw from softmax(l) (the
Gumbel-max trick), and the noise is a pure function of (the request's seed, a counter the engine advances per
generated token, v). So a request is seeded on its own, its draws do not depend on which rows share the batch or
where its row sits, there is no torch.Generator state to carry per request or to checkpoint, and it all runs as a
few element-wise kernels on the GPU. The engine must give each draw of a request its own counter (e.g. the index of
the token being generated): the same (seed, counter) gives the same noise.

The hash. Each element's 32 bits are MurmurHash3_x86_32 (hash seed 0) of the 20-byte little-endian message of five
32-bit words (seed mod 2^32, seed >> 32 mod 2^32, counter mod 2^32, counter >> 32 mod 2^32, v): the public
function, so any implementation of it is a reference (the tests check one written in plain Python against published
test vectors). It is done in int64 on the device; every multiply is split into 16-bit halves of the constant, so no
product exceeds 2^49 and nothing relies on int64 wrap-around. The words of (seed, counter) are hashed once per row,
only the last word and the finaliser run on [R, V]. Then u = min((h + 1/2) * 2^-32, 1 - 2^-24) in fp32: every
operation is a correctly rounded IEEE one (int -> fp32, +, * by a power of two, min), so u is bitwise the same on
every device, and it lies in [2^-33, 1 - 2^-24], strictly inside (0, 1) (the clamp moves the 2^-25 of the mass that
would round to 1.0, h >= 2^32 - 128, onto the largest fp32 below 1). The Gumbel noise is g = -log(-log1p(-u)): that
is -log(-log(u')) for u' = 1 - u, itself uniform, written so that the noise's right tail, which decides the winning
token, comes from small u, where fp32 and the 32-bit hash resolve it finely (about 3e-5 in g where a 129k-token flat
distribution's winner sits; computed from u near 1, fp32's spacing of 6e-8 below 1 would quantise it some 250 times
coarser and make ties among flat rows common).

What is and is not batch-invariant. The tokens and logprobs are a pure function of a row's logits, its settings,
seed and counter: a row gives the same result alone or in any batch, at any row, for the same logits (on CPU
bitwise; on a GPU the softmax/cumsum reductions may round differently with the row's memory alignment, so the
logprobs may move in the last bits and a top-p boundary that falls within rounding may move, while the Gumbel noise
and the scaled logits, element-wise, do not). The logits themselves are not batch-invariant: the model's matmuls
change shape with the batch composition, so a row's logits may differ in the last bits between batches, and a
near-tie between two tokens (in l/T + g) can then flip. log1p and log may also differ by an ulp between CPU and GPU
libraries, so the same counts for devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_MASK32 = 0xFFFFFFFF
_MURMUR_C1 = 0xCC9E2D51
_MURMUR_C2 = 0x1B873593
_MESSAGE_BYTES = 20  # five 32-bit words: seed lo/hi, counter lo/hi, vocabulary index
_U_MAX = 1.0 - 2.0**-24  # the largest fp32 below 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


# ----------------------------------------------------------------------------- settings
def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings. `temperature == 0` is greedy; `top_k == 0` and `top_p == 1` are off.
    Generation stops at `max_new_tokens`, at any of `stop_token_ids`, or once the text contains a stop string."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not _is_real(self.temperature) or not (0.0 <= self.temperature < math.inf):  # refuses NaN too
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not _is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):  # refuses NaN too
            raise ValueError(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if isinstance(self.stop_token_ids, (str, bytes)) or not hasattr(self.stop_token_ids, "__iter__"):
            raise ValueError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")
        stop_token_ids = tuple(self.stop_token_ids)
        if not all(_is_int(t) and t >= 0 for t in stop_token_ids):
            raise ValueError(f"stop_token_ids must be integers >= 0 (token ids), got {self.stop_token_ids!r}")
        if isinstance(self.stop_strings, (str, bytes)) or not hasattr(self.stop_strings, "__iter__"):
            raise ValueError(f"stop_strings must be a sequence of strings (not one string), got {self.stop_strings!r}")
        stop_strings = tuple(self.stop_strings)
        if not all(isinstance(s, str) and s for s in stop_strings):
            raise ValueError(f"stop_strings must be non-empty strings, got {self.stop_strings!r}")
        if not _is_int(self.seed) or not (_INT64_MIN <= self.seed <= _INT64_MAX):
            raise ValueError(f"seed must be an integer in the int64 range [-2**63, 2**63), got {self.seed!r}")
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        object.__setattr__(self, "stop_token_ids", stop_token_ids)
        object.__setattr__(self, "stop_strings", stop_strings)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# ----------------------------------------------------------------------------- warpers
def _check_rows(logits_RV: torch.Tensor, **per_row: torch.Tensor) -> None:
    if logits_RV.dim() != 2:
        raise ValueError(f"logits must be [R, V] (one row per sequence), got shape {tuple(logits_RV.shape)}")
    rows = logits_RV.shape[0]
    for name, t in per_row.items():
        if t.shape != (rows,):
            raise ValueError(f"{name} must have shape [R] = [{rows}] (one value per logits row), got {tuple(t.shape)}")


def processed_logits(
    logits_RV: torch.Tensor,
    temperature_R: torch.Tensor,
    top_k_R: torch.Tensor,
    top_p_R: torch.Tensor,
    truncated: bool = True,
) -> torch.Tensor:
    """fp32 [R, V]: the logits each row is sampled from, -inf outside its support (module docstring for the
    order and conventions). Per-row settings: temperature_R float (0 = greedy), top_k_R long (0 = off),
    top_p_R float in (0, 1] (1 = off), all on the logits' device. `truncated=False` is the caller's promise that
    no row uses top-k or top-p: the full-vocabulary sort is skipped (the result is the same)."""
    _check_rows(logits_RV, temperature_R=temperature_R, top_k_R=top_k_R, top_p_R=top_p_R)
    logits_RV = logits_RV.float()
    vocab = logits_RV.shape[-1]
    greedy_R1 = (temperature_R == 0).unsqueeze(-1)
    divisor_R1 = torch.where(greedy_R1, 1.0, temperature_R.float().unsqueeze(-1))
    scaled_RV = logits_RV / divisor_R1
    if not truncated:
        argmax_R1 = logits_RV.argmax(dim=-1, keepdim=True)
        greedy_RV = torch.full_like(logits_RV, -math.inf).scatter_(-1, argmax_R1, logits_RV.gather(-1, argmax_R1))
        return torch.where(greedy_R1, greedy_RV, scaled_RV)

    sorted_RV, order_RV = scaled_RV.sort(dim=-1, descending=True)
    k_R = torch.where((top_k_R <= 0) | (top_k_R >= vocab), vocab, top_k_R).long()
    kth_R1 = sorted_RV.gather(-1, (k_R - 1).unsqueeze(-1))
    outside_k_RV = scaled_RV < kth_R1
    sorted_RV = sorted_RV.masked_fill(sorted_RV < kth_R1, -math.inf)

    probs_sorted_RV = sorted_RV.softmax(dim=-1)
    more_likely_mass_RV = F.pad(probs_sorted_RV.cumsum(dim=-1)[:, :-1], (1, 0))  # mass of the tokens ranked above
    top_p_R1 = top_p_R.float().unsqueeze(-1)
    outside_p_sorted_RV = (more_likely_mass_RV >= top_p_R1) & (top_p_R1 < 1.0)
    outside_p_RV = torch.empty_like(outside_p_sorted_RV).scatter_(-1, order_RV, outside_p_sorted_RV)
    sampled_RV = scaled_RV.masked_fill(outside_k_RV | outside_p_RV, -math.inf)

    argmax_R1 = logits_RV.argmax(dim=-1, keepdim=True)
    greedy_RV = torch.full_like(logits_RV, -math.inf).scatter_(-1, argmax_R1, logits_RV.gather(-1, argmax_R1))
    return torch.where(greedy_R1, greedy_RV, sampled_RV)


# ----------------------------------------------------------------------------- noise
def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), in int64 without overflow: the constant is split into 16-bit
    halves, so each product stays below 2^48."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _rotl32(x: torch.Tensor, r: int) -> torch.Tensor:
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _murmur_block(h: torch.Tensor, word: torch.Tensor) -> torch.Tensor:
    """One 4-byte block of MurmurHash3_x86_32's body."""
    k = _mul32(_rotl32(_mul32(word, _MURMUR_C1), 15), _MURMUR_C2)
    h = _rotl32(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _MASK32


def _murmur_finish(h: torch.Tensor, num_bytes: int) -> torch.Tensor:
    h = h ^ num_bytes
    h = _mul32(h ^ (h >> 16), 0x85EBCA6B)
    h = _mul32(h ^ (h >> 13), 0xC2B2AE35)
    return h ^ (h >> 16)


def uniform_noise(seeds_R: torch.Tensor, counters_R: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 [R, vocab] in (0, 1): element (r, v) is a hash of (seeds_R[r], counters_R[r], v) alone, so it is the
    same in any batch, at any row, on any device (module docstring for the construction)."""
    if seeds_R.dim() != 1 or counters_R.shape != seeds_R.shape:
        raise ValueError(
            f"seeds and counters must both have shape [R], got {tuple(seeds_R.shape)} and {tuple(counters_R.shape)}"
        )
    seeds_R, counters_R = seeds_R.long(), counters_R.long()
    h_R = torch.zeros_like(seeds_R)  # the hash seed, 0
    for word_R in (seeds_R & _MASK32, (seeds_R >> 32) & _MASK32, counters_R & _MASK32, (counters_R >> 32) & _MASK32):
        h_R = _murmur_block(h_R, word_R)
    vocab_1V = torch.arange(vocab, device=seeds_R.device, dtype=torch.long).unsqueeze(0)
    return _unit_interval(_murmur_finish(_murmur_block(h_R.unsqueeze(-1), vocab_1V), _MESSAGE_BYTES))


def _unit_interval(bits: torch.Tensor) -> torch.Tensor:
    """32-bit hashes (int64 in [0, 2^32)) -> fp32 in [2^-33, 1 - 2^-24], strictly inside (0, 1)."""
    return ((bits.float() + 0.5) * 2.0**-32).clamp_(max=_U_MAX)


def gumbel_noise(seeds_R: torch.Tensor, counters_R: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 [R, vocab] Gumbel(0, 1) noise, -log(-log(1 - u)) of `uniform_noise` (why 1 - u: module docstring)."""
    return -torch.log(-torch.log1p(-uniform_noise(seeds_R, counters_R, vocab)))


# ----------------------------------------------------------------------------- sampling
@dataclass(frozen=True)
class SampledTokens:
    """One token per row with its logprob under the distribution sampled from (0 for greedy rows) and under the
    model's raw distribution (temperature 1, no filtering)."""

    tokens_R: torch.Tensor  # long
    sampled_logprob_R: torch.Tensor  # fp32
    raw_logprob_R: torch.Tensor  # fp32


def sample(
    logits_RV: torch.Tensor,
    temperature_R: torch.Tensor,
    top_k_R: torch.Tensor,
    top_p_R: torch.Tensor,
    seeds_R: torch.Tensor,
    counters_R: torch.Tensor,
    truncated: bool = True,
) -> SampledTokens:
    """One token per row: Gumbel-max over `processed_logits` with the row's (seed, counter) noise, or the argmax
    (first index on ties) for greedy rows; a row's token depends on its own logits, settings, seed and counter.
    `truncated=False`: no row uses top-k or top-p (see `processed_logits`)."""
    _check_rows(logits_RV, seeds_R=seeds_R, counters_R=counters_R)
    logits_RV = logits_RV.float()
    processed_RV = processed_logits(logits_RV, temperature_R, top_k_R, top_p_R, truncated)
    gumbel_RV = gumbel_noise(seeds_R, counters_R, logits_RV.shape[-1])
    greedy_R = temperature_R == 0
    tokens_R = torch.where(greedy_R, logits_RV.argmax(dim=-1), (processed_RV + gumbel_RV).argmax(dim=-1))
    tokens_R1 = tokens_R.unsqueeze(-1)
    sampled_logprob_R = processed_RV.log_softmax(dim=-1).gather(-1, tokens_R1).squeeze(-1)
    raw_logprob_R = logits_RV.log_softmax(dim=-1).gather(-1, tokens_R1).squeeze(-1)
    return SampledTokens(tokens_R, torch.where(greedy_R, 0.0, sampled_logprob_R), raw_logprob_R)


# ----------------------------------------------------------------------------- one decode step's draw
SAMPLING_KINDS = ("greedy", "sampled", "truncated")


def sampling_kind(params: list[SamplingParams]) -> str:
    """How much of `sample` a step's rows need: "greedy" (every row temperature 0: the argmax, no noise),
    "sampled" (no row uses top-k or top-p: no vocabulary sort) or "truncated"."""
    if all(p.greedy for p in params):
        return "greedy"
    return "truncated" if any(p.top_k > 0 or p.top_p < 1.0 for p in params) else "sampled"


def draw(
    kind: str,
    logits_RV: torch.Tensor,
    temperature_R: torch.Tensor,
    top_k_R: torch.Tensor,
    top_p_R: torch.Tensor,
    seeds_R: torch.Tensor,
    counters_R: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sample`'s (tokens, sampled logprobs, raw logprobs) for rows of `sampling_kind` `kind`. A greedy step takes
    the argmax (first index on ties, as `sample` does for greedy rows) and skips the noise and the warpers."""
    if kind == "greedy":
        logits_RV = logits_RV.float()
        tokens_R = logits_RV.argmax(dim=-1)
        raw_logprob_R = logits_RV.log_softmax(dim=-1).gather(-1, tokens_R.unsqueeze(-1)).squeeze(-1)
        return tokens_R, torch.zeros_like(raw_logprob_R), raw_logprob_R
    if kind not in SAMPLING_KINDS:
        raise ValueError(f"sampling kind must be one of {SAMPLING_KINDS}, got {kind!r}")
    drawn = sample(logits_RV, temperature_R, top_k_R, top_p_R, seeds_R, counters_R, truncated=kind == "truncated")
    return drawn.tokens_R, drawn.sampled_logprob_R, drawn.raw_logprob_R
