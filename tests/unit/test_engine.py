"""The generation engine (inference/engine.py) against references outside it: greedy completions equal the repeated
full forwards of inference/full_forward.py (with fewer cache slots than requests, so requests queue and join a
running batch, and with more) and transformers' greedy `generate()` on the same exported weights; a seeded request
samples the same tokens alone, in a batch and at another index; the logprobs are log_softmax of a float64 full
forward's logits (raw) and of the temperature / top-k / top-p distribution built here by hand (sampled); the routes
are the full forward's; every finish reason; bad requests are refused before any forward."""

import copy
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from dsv4train.inference.engine import Engine
from dsv4train.inference.full_forward import generate_full_forward
from dsv4train.inference.sampling import SamplingParams
from dsv4train.models.model import DSV4Model
from dsv4train.testing.sensitive_models import SENSITIVE_INIT, sensitive_model
from dsv4train.testing.toy_configs import TIE_FREE_INDEX_HEADS, tiny_config

VOCAB = 300
MAX_SEQ_LEN = 64
MIXED = ("swa", "csa", "hca", "csa")
N_HASH_LAYERS = 1
# 8 prompts: 1, around the CSA (4) / window and HCA (8) boundaries, and 45 + 24 > 64 (stops at max_seq_len)
PROMPT_LENGTHS = (5, 30, 13, 1, 20, 2, 9, 45)
NEW_TOKENS = 24
EOS = 173  # the greedy continuations of prompts 0 and 4 produce it early: they stop and free their slots
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(EOS,))
SAMPLED = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, top_k=20)
# Engine (fp32 logits through the cache) against a float64 full forward: the fp32 logits carry ~1e-6 relative
# rounding, ~5e-6 absolute at these models' |logits| <= 5.3, and a logprob l_v - logsumexp(l) moves by at most twice
# the largest logit error. Measured <= 4e-6.
LOGPROB_TOL = 2e-5
# The same request in batches of other shapes: its logits are equal only up to fp32 rounding (other matrix shapes,
# other summation orders); measured <= 2.7e-6.
BATCH_LOGPROB_TOL = 1e-5


def build_model(**overrides) -> DSV4Model:
    """A random model whose attention matters: init_std 0.15 / hc_init_std 0.2 (changing token 0 then moves the last
    logits by ~20%) and the tensors the init sets to constants (sinks, position biases, norms) perturbed."""
    cfg = tiny_config(
        MIXED,
        vocab_size=VOCAB,
        max_seq_len=MAX_SEQ_LEN,
        n_hash_layers=N_HASH_LAYERS,
        **{**SENSITIVE_INIT, **overrides},
    )
    return sensitive_model(cfg)


@pytest.fixture(scope="module")
def model() -> DSV4Model:
    return build_model()  # sparse indexer, tiny's 2 index heads: the tie rule of select_topk matters


@pytest.fixture(scope="module")
def model64(model) -> DSV4Model:
    """The same weights in float64: the reference of the logprobs, which fp32 rounding does not touch."""
    return copy.deepcopy(model).double()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def greedy_reference(model, prompts) -> list[list[int]]:
    return generate_full_forward(model, prompts, NEW_TOKENS, eos_id=EOS, progress=False)


@pytest.fixture(scope="module")
def sampled(model, prompts):
    """Sampled completions of the 8 prompts in one call, 3 slots, explicit seeds."""
    return Engine(model, max_batch=3).generate(prompts, SAMPLED, seeds=list(range(100, 108)))


class ForwardLog:
    """Records every forward of the model: (prefill?, rows) with a cache, ("full", rows) without."""

    def __init__(self, model):
        self.calls = []
        self.handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        step = kwargs.get("cache")
        ids = args[0] if args else kwargs["input_ids"]
        self.calls.append(("full" if step is None else "prefill" if step.prefill else "decode", ids.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def argmax_loop(model, prompt: list[int], n: int) -> list[int]:
    """The obvious greedy reference: the whole sequence forwarded for every token, no EOS."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            sequence.append(int(model(torch.tensor([sequence]))[0, -1].argmax()))
    return sequence[len(prompt) :]


def processed_logprobs(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float) -> dict[int, float]:
    """The distribution sampled from, written out (float64, no sampling.py): logits / T; keep the top_k largest
    (and ties with the k-th); of those, in order of probability, keep a token while the tokens before it hold less
    than top_p of the mass; renormalise. Returns {token: logprob} over the kept tokens."""
    scaled = [float(x) / temperature for x in logits_V.double()]
    order = sorted(range(len(scaled)), key=lambda v: -scaled[v])
    kth = scaled[order[top_k - 1]]
    kept = [v for v in order if scaled[v] >= kth]
    z = math.log(sum(math.exp(scaled[v]) for v in kept))
    nucleus, mass = [], 0.0
    for v in kept:
        if mass >= top_p:
            break
        nucleus.append(v)
        mass += math.exp(scaled[v] - z)
    z = math.log(sum(math.exp(scaled[v]) for v in nucleus))
    return {v: scaled[v] - z for v in nucleus}


def float64_logits(model64, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] of one full forward in float64."""
    with torch.no_grad():
        return model64(torch.tensor([ids]))[0]


# ------------------------------------------------------------------------------------------------ greedy
@pytest.mark.parametrize("max_batch", [3, 16])
def test_greedy_completions_equal_the_full_forward_reference(model, model64, prompts, greedy_reference, max_batch):
    """3 slots for 8 requests: they queue, and each joins the running batch (a prefill between decode steps) when
    a slot frees (the 1-token prompt alone, into the slot prompt 0 used); 16 slots: all prefilled at once. Token
    for token the same as repeated full forwards, and the raw logprobs those of a float64 full forward (the logits
    themselves, not only their argmax)."""
    assert sum(EOS in out for out in greedy_reference) >= 2  # some stop early, some run to the length limits
    engine = Engine(model, max_batch=max_batch)
    with ForwardLog(model) as log:
        out = engine.generate(prompts, GREEDY)
    assert [c.token_ids for c in out] == greedy_reference
    assert all(c.logprobs == [0.0] * len(c.token_ids) for c in out)  # greedy: a point mass
    for c, prompt in zip(out, prompts):
        n = len(c.token_ids)
        logits = float64_logits(model64, prompt + c.token_ids[:-1])[len(prompt) - 1 :]
        raw_want = logits.log_softmax(-1)[torch.arange(n), torch.tensor(c.token_ids)]
        assert c.raw_logprobs == pytest.approx(raw_want.tolist(), abs=LOGPROB_TOL)
    for c, prompt in zip(out, prompts):
        stopped = c.token_ids[-1] == EOS
        assert c.finish_reason == ("stop" if stopped else "length")
        if not stopped:
            assert len(c.token_ids) == min(NEW_TOKENS, MAX_SEQ_LEN - len(prompt))
    assert max(rows for _, rows in log.calls) <= max_batch
    kinds = [kind for kind, _ in log.calls]
    assert "full" not in kinds
    if max_batch < len(prompts):
        assert ("prefill", 1) in log.calls[kinds.index("decode") :]  # a request joined a running batch alone
    else:
        assert kinds.count("prefill") == 1 and log.calls[0] == ("prefill", len(prompts))


def test_greedy_completions_equal_transformers_generate():
    """transformers' DeepseekV4ForCausalLM (eager attention and experts, its own KV cache in `generate()`) holding
    our weights exported by models/hf.py: the same 12 greedy tokens for 3 prompts. 16 index heads: transformers'
    sparse top-k uses torch.topk, which orders exact score ties its own way (testing/toy_configs.py)."""
    transformers = pytest.importorskip("transformers")
    from dsv4train.models.hf import hf_config_kwargs, to_hf_state_dict

    ours = build_model(index_n_heads=TIE_FREE_INDEX_HEADS)
    hf_cfg = transformers.DeepseekV4Config(**hf_config_kwargs(ours.cfg))
    hf_cfg._attn_implementation = "eager"
    hf_cfg._experts_implementation = "eager"
    ref = transformers.DeepseekV4ForCausalLM(hf_cfg).eval()
    missing, unexpected = ref.load_state_dict(to_hf_state_dict(ours.state_dict()), strict=False)
    assert not unexpected and all("inv_freq" in k for k in missing), (missing, unexpected)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (5, 13, 22)]
    out = Engine(ours, max_batch=2).generate(prompts, SamplingParams(max_new_tokens=12, temperature=0.0))
    for prompt, completion in zip(prompts, out):
        with torch.no_grad():  # min_new_tokens: HF's EOS (id 1) may not end it early
            want = ref.generate(
                torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=True
            )
        assert completion.token_ids == want[0, len(prompt) :].tolist()


def test_a_compiled_engine_generates_what_the_eager_one_does(model, model64, prompts, greedy_reference, sampled):
    """compile=True: each decode step, with its draw, is one compiled graph over all 3 slots, the slots no request
    holds decoding a dummy token. 8 requests queue through 3 slots, so steps run with free slots (after early stops
    and at the end). Greedy: the full-forward reference's tokens, raw logprobs those of the float64 forward.
    Sampled (top-k and top-p): the eager engine's tokens and routes, logprobs to BATCH_LOGPROB_TOL (other kernels,
    other fp32 summation order). Each of the two sampling kinds is traced once into one graph (no break, no
    recompile)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        engine = Engine(model, max_batch=3, compile=True)
        greedy = engine.generate(prompts, GREEDY)
        drawn = engine.generate(prompts, SAMPLED, seeds=list(range(100, 108)))
    assert counters["stats"]["unique_graphs"] == 2
    assert [c.token_ids for c in greedy] == greedy_reference
    for c, prompt in zip(greedy, prompts):
        logits = float64_logits(model64, prompt + c.token_ids[:-1])[len(prompt) - 1 :]
        raw_want = logits.log_softmax(-1)[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
        assert c.raw_logprobs == pytest.approx(raw_want.tolist(), abs=LOGPROB_TOL)
    for c, eager in zip(drawn, sampled):
        assert c.token_ids == eager.token_ids and c.finish_reason == eager.finish_reason
        assert c.logprobs == pytest.approx(eager.logprobs, abs=BATCH_LOGPROB_TOL)
        assert c.raw_logprobs == pytest.approx(eager.raw_logprobs, abs=BATCH_LOGPROB_TOL)
        assert c.routes.keys() == eager.routes.keys()
        assert all(torch.equal(c.routes[i], eager.routes[i]) for i in c.routes)


def test_a_compiled_engine_follows_a_switch_of_the_indexer_mode(prompts):
    """The compiled step keeps dynamo's guards on module flags (engine.py drops only nn.Module bookkeeping guards):
    switching the CSA layers to the dense indexer after the first compiled step recompiles, and the compiled
    engine then generates what an eager dense one does. Dense and sparse pick differently on these prompts
    (checked below, so the comparison can fail)."""
    from torch._dynamo.utils import counters

    # One CSA layer keeps the two compiles short; the prompts' 30 and 20 tokens give it 5 to 13 compressed entries
    # at csa_ratio 4 (overlapping windows), more than its top-k of 3.
    one_csa = sensitive_model(tiny_config(("csa",), vocab_size=VOCAB, max_seq_len=MAX_SEQ_LEN, **SENSITIVE_INIT))
    long_prompts = [prompts[1], prompts[4]]
    torch._dynamo.reset()
    counters.clear()
    engine = Engine(one_csa, max_batch=2, compile=True)
    sparse = engine.generate(long_prompts, GREEDY)
    one_csa.set_indexer_mode("dense")
    dense = engine.generate(long_prompts, GREEDY)
    assert counters["stats"]["unique_graphs"] == 2
    eager_dense = Engine(one_csa, max_batch=2).generate(long_prompts, GREEDY)
    for compiled_dense, eager in zip(dense, eager_dense, strict=True):
        assert compiled_dense.token_ids == eager.token_ids
        assert compiled_dense.raw_logprobs == pytest.approx(eager.raw_logprobs, abs=BATCH_LOGPROB_TOL)
    assert any(
        s.token_ids != d.token_ids or s.raw_logprobs != pytest.approx(d.raw_logprobs, abs=BATCH_LOGPROB_TOL)
        for s, d in zip(sparse, dense, strict=True)
    )


# ------------------------------------------------------------------------------------------------ sampling
def test_a_seeded_request_samples_the_same_alone_in_a_batch_and_at_another_index(model, prompts, sampled):
    """Request 1 (seed 101): alone in a 1-slot engine, second in the batch of 8 (3 slots), and at index 6 of the
    reversed batch (8 slots: another row of a full batch, prefilled next to other prompts). Identical tokens;
    logprobs to BATCH_LOGPROB_TOL."""
    alone = Engine(model, max_batch=1).generate([prompts[1]], SAMPLED, seeds=[101])[0]
    reversed_batch = Engine(model, max_batch=8).generate(prompts[::-1], SAMPLED, seeds=list(range(107, 99, -1)))
    for other in (sampled[1], reversed_batch[-2]):
        assert other.token_ids == alone.token_ids
        assert other.logprobs == pytest.approx(alone.logprobs, abs=BATCH_LOGPROB_TOL)
        assert other.raw_logprobs == pytest.approx(alone.raw_logprobs, abs=BATCH_LOGPROB_TOL)
    # the draws are draws: another seed gives other tokens for this near-uniform model
    reseeded = Engine(model, max_batch=1).generate([prompts[1]], SAMPLED, seeds=[102])[0]
    assert reseeded.token_ids != alone.token_ids


def test_each_token_of_a_request_is_a_fresh_draw(model, prompts):
    """With the output head zeroed every logit is 0: each token is a uniform draw over the 300 ids, with logprob
    -log(300) under both distributions. n draws of one request (40, or what max_seq_len leaves) repeat an id about
    n^2/600 times (at most 2.7); n/2 repeats or more has probability < 1e-8. Noise that did not change from one
    token to the next would draw the same id every time."""
    uniform = copy.deepcopy(model)
    with torch.no_grad():
        uniform.head.weight.zero_()
    out = Engine(uniform, max_batch=8).generate(prompts, SamplingParams(max_new_tokens=40, temperature=1.0))
    for c, prompt in zip(out, prompts):
        n = min(40, MAX_SEQ_LEN - len(prompt))
        assert len(c.token_ids) == n and len(set(c.token_ids)) > n // 2
        assert c.logprobs == pytest.approx([-math.log(VOCAB)] * n, abs=1e-6)
        assert c.raw_logprobs == pytest.approx([-math.log(VOCAB)] * n, abs=1e-6)


def test_raw_and_sampled_logprobs_are_those_of_the_full_forward(model64, prompts, sampled):
    for prompt, c in zip(prompts, sampled):
        n = len(c.token_ids)
        assert len(c.logprobs) == len(c.raw_logprobs) == n
        logits = float64_logits(model64, prompt + c.token_ids[:-1])[len(prompt) - 1 :]  # the n logits sampled from
        assert logits.shape[0] == n
        raw_want = logits.log_softmax(-1)[torch.arange(n), torch.tensor(c.token_ids)]
        assert c.raw_logprobs == pytest.approx(raw_want.tolist(), abs=LOGPROB_TOL)
        for j, token in enumerate(c.token_ids):
            support = processed_logprobs(logits[j], SAMPLED.temperature, SAMPLED.top_k, SAMPLED.top_p)
            assert token in support, f"token {j} ({token}) is outside the top-k / top-p support"
            assert c.logprobs[j] == pytest.approx(support[token], abs=LOGPROB_TOL)
        assert all(lp > raw for lp, raw in zip(c.logprobs, c.raw_logprobs))  # the truncation mattered


def test_temperature_scales_the_sampled_distribution(model, model64, prompts):
    params = SamplingParams(max_new_tokens=6, temperature=0.5, top_k=5)
    c = Engine(model, max_batch=2).generate(prompts[:2], params, seeds=[7, 8])[1]
    logits = float64_logits(model64, prompts[1] + c.token_ids[:-1])[len(prompts[1]) - 1 :]
    for j, token in enumerate(c.token_ids):
        support = processed_logprobs(logits[j], 0.5, 5, 1.0)
        assert len(support) == 5 and c.logprobs[j] == pytest.approx(support[token], abs=2 * LOGPROB_TOL)


# ------------------------------------------------------------------------------------------------ routes
def test_routes_are_the_full_forwards_over_prompt_and_completion(model, prompts, greedy_reference, sampled):
    """For every learned-routing layer (the hash layer is left out): one row per token the cache saw, the prompt
    and every generated token but the last, equal to the experts of one full forward over those tokens."""
    out = Engine(model, max_batch=3).generate(prompts, GREEDY)
    learned = set(range(N_HASH_LAYERS, len(MIXED)))
    for prompt, c in [*zip(prompts, out), *zip(prompts, sampled)]:
        assert set(c.routes) == learned
        ids = torch.tensor([prompt + c.token_ids[:-1]])
        with torch.no_grad():
            _, auxes = model.run_layers(model.embed_streams(ids), ids, model.layers)
        for i in learned:
            assert c.routes[i].shape == (len(prompt) + len(c.token_ids) - 1, model.cfg.n_activated_experts)
            assert torch.equal(c.routes[i], auxes[i].moe.routes_BSK[0]), f"layer {i}"


# ------------------------------------------------------------------------------------------------ finishing
def word_tokenizer() -> Tokenizer:
    """Token v is the word 'w<v>'; decoding joins words with spaces."""
    tok = Tokenizer(models.WordLevel({f"w{v}": v for v in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_finish_reasons(model, prompts):
    prompt = prompts[2]  # 13 tokens
    free_run = argmax_loop(model, prompt, 20)
    greedy = dict(temperature=0.0, max_new_tokens=20)
    engine = Engine(model, max_batch=2, tokenizer=word_tokenizer())

    # a stop token: kept as the last token
    k = next(j for j in range(5, 20) if free_run[j] not in free_run[:j])
    (c,) = engine.generate([prompt], SamplingParams(**greedy, stop_token_ids=(free_run[k], VOCAB + 5)))
    assert (c.token_ids, c.finish_reason) == (free_run[: k + 1], "stop")

    # a stop string spanning two tokens: generation stops at the token that completes it; the text is cut before it
    stop = f"w{free_run[7]} w{free_run[8]}"
    text = word_tokenizer().decode(free_run, skip_special_tokens=False)
    cut = text.index(stop)
    ends = next(j for j in range(20) if stop in word_tokenizer().decode(free_run[: j + 1]))
    (c,) = engine.generate([prompt], SamplingParams(**greedy, stop_strings=("never there", stop)))
    assert (c.token_ids, c.finish_reason, c.text) == (free_run[: ends + 1], "stop", text[:cut])

    # max_new_tokens
    (c,) = engine.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=9))
    assert (c.token_ids, c.finish_reason, c.text) == (free_run[:9], "length", " ".join(f"w{v}" for v in free_run[:9]))

    # the cache's max_len: the sequence grows to exactly max_len tokens
    short = Engine(model, max_batch=2, max_len=20)
    out = short.generate([prompt, prompts[1][:19]], SamplingParams(**greedy))
    assert [(c.token_ids, c.finish_reason) for c in out] == [
        (free_run[: 20 - len(prompt)], "length"),
        (argmax_loop(model, prompts[1][:19], 1), "length"),
    ]


@pytest.mark.parametrize(
    "build, call, message",
    [
        (dict(), dict(prompts=[[5], []]), "prompt 1 is empty"),
        (dict(max_len=16), dict(prompts=[[5], list(range(2, 18))]), "prompt 1 has 16 tokens.*at most 15"),
        (dict(), dict(prompts=[list(range(2, 2 + MAX_SEQ_LEN))]), "prompt 0 has 64 tokens.*at most 63"),
        (dict(), dict(prompts=[[5, VOCAB]]), r"outside the vocabulary \[0, 300\)"),
        (dict(), dict(prompts=[[5], [-1, 4]]), "outside the vocabulary"),
        (dict(), dict(params=SamplingParams(stop_strings=("w5",))), "give Engine a tokenizer"),
        (dict(), dict(params=[SamplingParams()] * 3), "3 SamplingParams for 2 prompts"),
        (dict(), dict(seeds=[1]), "1 seeds for 2 prompts"),
        (dict(max_batch=0), None, "max_batch must be a positive integer"),
        (dict(max_len=MAX_SEQ_LEN + 1), None, "max_len must be an integer"),
        (dict(max_len=1), None, "max_len must be an integer"),
    ],
)
def test_bad_requests_are_refused_before_any_forward(model, build, call, message):
    with ForwardLog(model) as log:
        with pytest.raises(ValueError, match=message):
            engine = Engine(model, **build)
            engine.generate(**{"prompts": [[5, 6], [7]], "params": SamplingParams(max_new_tokens=3), **(call or {})})
    assert log.calls == []
