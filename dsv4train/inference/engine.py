"""The generation engine: batched prefill and decode through DeepSeek-V4's hybrid KV cache (models/kv_cache.py),
with continuous batching and per-request seeded sampling on the device.

    engine = Engine(model, max_batch=16)
    completions = engine.generate(prompts, SamplingParams(max_new_tokens=256, temperature=1.0, seed=0))

How a call runs. Requests wait in a queue; the cache has `max_batch` slots. Whenever slots are free, waiting
requests join: their prompts are prefilled together (right-padded rows of one ordinary forward, which also fills
their slots: a real token never attends to padding, attention being causal) and their first token is sampled
from the logits at each prompt's last position. Then every running request advances one token per decode step
(one [R, 1] forward through the cache). A request finishes on its own (a stop token, a stop string, its
`max_new_tokens`, or the cache's `max_len`) and frees its slot, which the next waiting request takes before the
following step. More requests than slots queue; none is dropped.

What a completion holds (`Completion`): the generated ids (the stop token included), the log-probability of each
under the distribution it was sampled from (temperature, top-k and top-p applied; 0 for greedy, a point mass) and
under the model's own distribution (raw logits), the finish reason, and for every MoE layer with learned routing
the k experts each token went through: the prompt's tokens and every generated token that was fed back (all but
the last), which is what a training forward over prompt + completion replays (GRPO's keep-routing). Hash layers
route by token id and are left out.

Batch invariance. The sampled token is a pure function of the row's logits, its request's seed and the token's
index (inference/sampling.py): it never depends on the other rows or on when the request joined. The logits
themselves are the same up to fp32 rounding in any batch (matrix shapes change the summation order), so a near-tie
between two tokens can still flip; `tests/unit/test_engine.py` checks a request alone against the same request in a
full batch.

Equality with the full forward: a decode step's logits equal one full forward over the whole sequence (fp32, to
~1e-6 relative): same window, same compressed entries, same indexer top-k with the same tie rule. The reference is
`inference/full_forward.py`."""

from __future__ import annotations

import numbers
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from dsv4train.inference.full_forward import request_seed
from dsv4train.inference.sampling import SAMPLING_KINDS, SamplingParams, draw, sampling_kind
from dsv4train.inference.wal import LoggedRequest, RolloutWAL
from dsv4train.models.kv_cache import CacheStep, LayerCache, allocate_layer_caches

DEFAULT_MAX_PREFILL_TOKENS = 8192  # padded prompt tokens per prefill forward
DEFAULT_PARAMS = SamplingParams()


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # under the distribution sampled from
    raw_logprobs: list[float]  # under the model's (temperature 1, no truncation)
    finish_reason: str  # "stop" (a stop token or string) or "length" (max_new_tokens or the cache's max_len)
    routes: dict[int, torch.Tensor]  # learned-routing MoE layer index -> experts [prompt + generated - 1, k]
    text: str | None = None  # with a tokenizer: the decoded completion, cut before a stop string that ended it
    resumed: int = 0  # leading tokens taken from a rollout WAL (inference/wal.py) rather than sampled in this call


@dataclass
class _Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    slot: int = -1
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    prefix_routes: list[torch.Tensor] = field(default_factory=list)  # per learned layer [prefilled tokens, k]
    first_step: int = -1  # the engine's first decode step that fed this request (_StepRoutes), -1 before it
    routes: dict[int, torch.Tensor] | None = None  # Completion.routes, set when the request finishes
    finish_reason: str | None = None
    text: str | None = None
    resumed: int = 0

    @property
    def length(self) -> int:
        """Tokens in the cache: the prompt and every generated token fed back."""
        return len(self.prompt) + max(len(self.generated) - 1, 0)

    @property
    def context(self) -> list[int]:
        """What a prefill puts in the cache: the prompt, and for a request resumed from a WAL its logged tokens
        but the last (the next decode step feeds that one, as for a request that never stopped)."""
        return self.prompt + self.generated[:-1]

    def restore(self, logged: LoggedRequest) -> None:
        self.generated, self.resumed = list(logged.token_ids), len(logged.token_ids)
        self.logprobs, self.raw_logprobs = list(logged.logprobs), list(logged.raw_logprobs)
        self.prefix_routes = [torch.cat([p, f]) for p, f in zip(logged.prompt_routes, logged.fed_routes)]


class Engine:
    """Generation for one DSV4Model (eval mode, on its device, in its dtype) with a cache of `max_batch` slots of
    `max_len` tokens (default the model's max_seq_len). `cache_dtype`: "model" keeps the cache in the model's
    dtype; "fp8" stores main entries in FP8 E4M3 (RoPE dims BF16) and indexer keys in FP4, V4's layout (the
    bytes of `models/flops.py`'s formula; models/kv_store.py).

    `compile=True` runs every decode step, with the draw of its tokens, as one `torch.compile`d graph of fixed
    shape (one per sampling kind, `sampling.sampling_kind`): all `max_batch` rows every step, the slots no
    request holds decoding a dummy token at position 0 (their contents are garbage until a prefill fills them,
    so nothing is lost). The first step compiles (about a minute for the toy flavor
    on 2 CPU cores); later steps skip eager PyTorch's per-operator overhead (`compile_decode_step`: guards without
    nn.Module bookkeeping, so forward hooks added after the first step are not run; a C++ wrapper on the CPU).
    Switching a module flag such as the indexer mode recompiles. Prefill stays eager (its shapes change with
    every group of prompts). CUDA graphs are not used."""

    def __init__(
        self,
        model: nn.Module,
        max_batch: int = 16,
        max_len: int | None = None,
        tokenizer=None,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        cache_dtype: str = "model",
        compile: bool = False,
    ):
        cfg = model.cfg
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        max_len = cfg.max_seq_len if max_len is None else max_len
        if not isinstance(max_len, int) or not 2 <= max_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_len must be an integer in [2, the model's max_seq_len {cfg.max_seq_len}], got {max_len!r}"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_len, self.max_prefill_tokens = max_batch, max_len, max_prefill_tokens
        weight = model.embed.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.learned_layers = model.learned_routing_layers
        self.caches: list[LayerCache] = allocate_layer_caches(
            model, max_batch, max_len, self.dtype, self.device, cache_dtype
        )
        self.compiled = compile
        self._step_routes = _StepRoutes(max_batch)
        # One decode-and-draw step per sampling kind; three functions, so that compiled, one kind never recompiles
        # another (torch.compile keeps one cache per function)
        steps = (self._decode_greedy, self._decode_sampled, self._decode_truncated)
        self._decode_steps = {
            kind: compile_decode_step(f, self.device) if compile else f for kind, f in zip(SAMPLING_KINDS, steps)
        }

    # ------------------------------------------------------------------------------------------ checks
    def check(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> None:
        """A ValueError naming the first bad request, before any work."""
        V = self.model.cfg.vocab_size
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if len(prompt) == 0:
                raise ValueError(f"prompt {i} is empty: generation needs at least one token to continue")
            if len(prompt) > self.max_len - 1:
                raise ValueError(
                    f"prompt {i} has {len(prompt)} tokens, but the cache holds {self.max_len} per sequence (the "
                    f"model's max_seq_len unless max_len was given): at most {self.max_len - 1} leave room for a new "
                    "token; shorten it"
                )
            not_ids = [t for t in prompt if isinstance(t, bool) or not isinstance(t, numbers.Integral)]
            if not_ids:
                raise ValueError(f"prompt {i} holds values that are not integer token ids: {not_ids[:5]}")
            bad = [int(t) for t in prompt if not 0 <= t < V]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {V}): {bad[:5]}")
            if p.stop_strings and self.tokenizer is None:
                raise ValueError(f"request {i} has stop_strings {list(p.stop_strings)}: give Engine a tokenizer")

    # ------------------------------------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = DEFAULT_PARAMS,
        seeds: Sequence[int] | None = None,
        progress: bool = False,
        on_token: Callable[[int, int], None] | None = None,
        wal: RolloutWAL | None = None,
    ) -> list[Completion]:
        """One completion per prompt, in order. `params`: one for all, or one per prompt. `seeds`: each request's
        sampling seed (default `request_seed(params.seed, index)`). `on_token(request index, token id)` is called
        for every token as it is sampled (streaming), after the WAL has it. `wal`: every sampled token is logged
        there before the next step, and requests it already holds (same prompt, seed and policy version) continue
        from their logged tokens (inference/wal.py)."""
        prompts = [list(p) for p in prompts]
        per_request = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_request) != len(prompts):
            raise ValueError(f"{len(per_request)} SamplingParams for {len(prompts)} prompts: give one, or one each")
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        for i, seed in enumerate(seeds or ()):
            if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**63:
                raise ValueError(f"seeds[{i}] = {seed!r}: a seed must be an integer that fits in int64")
        self.check(prompts, per_request)
        prompts = [[int(t) for t in p] for p in prompts]
        self._on_token, self._wal = on_token, wal
        requests = [
            _Request(i, prompt, p, request_seed(p.seed, i) if seeds is None else int(seeds[i]))
            for i, (prompt, p) in enumerate(zip(prompts, per_request))
        ]
        for r in requests:
            logged = wal.resume(r.index, r.prompt, r.seed) if wal is not None else None
            if logged is not None and logged.token_ids:
                r.restore(logged)
                r.finish_reason = self._finish_reason(r)
        waiting, running = deque(r for r in requests if r.finish_reason is None), []
        free = list(range(self.max_batch))
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not progress)
        bar.update(len(requests) - len(waiting))
        while waiting or running:
            joining = []
            while waiting and free:
                request = waiting.popleft()
                request.slot = free.pop(0)
                joining.append(request)
            for group in self._prefill_groups(joining):
                self._prefill(group)
            running = self._release(running + joining, free, bar)
            if running:
                self._decode(running)
                running = self._release(running, free, bar)
        bar.close()
        return [self._completion(r) for r in requests]

    def _release(self, running: list[_Request], free: list[int], bar) -> list[_Request]:
        """The requests still running; the finished ones take their routes and free their slots."""
        still = []
        for r in running:
            if r.finish_reason is None:
                still.append(r)
            else:
                r.routes = self._routes(r)
                free.append(r.slot)
                bar.update(1)
        free.sort()
        self._step_routes.drop_before(min((r.first_step for r in still if r.first_step >= 0), default=None))
        return still

    def _routes(self, r: _Request) -> dict[int, torch.Tensor]:
        """Completion.routes: the prefilled tokens' routes, then those of every decode step that fed the request."""
        decoded_LTK = self._step_routes.of_slot(r.slot, r.first_step)
        if decoded_LTK is None:
            return dict(zip(self.learned_layers, r.prefix_routes))
        return {i: torch.cat([p, d]) for i, p, d in zip(self.learned_layers, r.prefix_routes, decoded_LTK)}

    def _prefill_groups(self, joining: list[_Request]) -> list[list[_Request]]:
        """Joining requests cut into prefill forwards of at most max_prefill_tokens padded tokens (at least one
        request each), longest first so rows of similar length share a forward."""
        groups, group = [], []
        for r in sorted(joining, key=lambda r: -len(r.context)):
            if group and len(group[0].context) * (len(group) + 1) > self.max_prefill_tokens:
                groups.append(group)
                group = []
            group.append(r)
        return groups + ([group] if group else [])

    def _prefill(self, group: list[_Request]) -> None:
        """Fill the group's slots with their contexts; sample the first token of each fresh request (a resumed one
        has its next token's input logged already, and keeps its logged routes)."""
        contexts = [r.context for r in group]
        lengths = [len(c) for c in contexts]
        ids_RL = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for row, context in enumerate(contexts):
            ids_RL[row, : len(context)] = torch.as_tensor(context)
        lengths_R = torch.tensor(lengths, device=self.device)
        step = CacheStep(self.caches, self._slots(group), lengths_R=lengths_R)
        last_RV = self.model(ids_RL.to(self.device), cache=step)[:, 0]
        fresh = [row for row, r in enumerate(group) if not r.generated]
        for row in fresh:
            group[row].prefix_routes = [step.routes[i][row, : lengths[row]].cpu() for i in self.learned_layers]
        fresh_requests = [group[row] for row in fresh]
        if self._wal is not None:
            self._wal.log_requests([(r.index, r.prompt, r.seed, r.prefix_routes) for r in fresh_requests])
        if fresh:
            kind = sampling_kind([r.params for r in fresh_requests])
            drawn = draw(kind, last_RV[fresh], *self._settings(fresh_requests))
            self._record(fresh_requests, drawn)

    def _decode(self, running: list[_Request]) -> None:
        tokens = [r.generated[-1] for r in running]
        positions = [r.length for r in running]
        slots = [r.slot for r in running]
        kind = sampling_kind([r.params for r in running])
        settings = self._settings(running, rows=self.max_batch if self.compiled else len(running))
        if self.compiled:  # one shape for every step: the free slots decode a dummy token at position 0
            spare = sorted(set(range(self.max_batch)) - set(slots))
            tokens, positions, slots = tokens + [0] * len(spare), positions + [0] * len(spare), slots + spare
        inputs = (
            torch.tensor(tokens, device=self.device).unsqueeze(1),
            torch.tensor(slots, device=self.device),
            torch.tensor(positions, device=self.device),
        )
        *drawn, routes_LR1K = self._decode_steps[kind](*inputs, *settings)
        fed_SLK = self._step_routes.append(routes_LR1K[:, :, 0], inputs[1])
        for r in running:
            if r.first_step < 0:
                r.first_step = self._step_routes.count - 1
        self._record(running, [t[: len(running)] for t in drawn], fed_SLK)

    def _decode_and_draw(
        self, kind: str, tokens_R1: torch.Tensor, slots_R: torch.Tensor, positions_R: torch.Tensor, *settings
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decode step and its draw (`sampling.draw`; `settings`: `_settings`' five per-row tensors): (tokens,
        sampled logprobs, raw logprobs [R], routes of the learned-routing layers [layers, R, 1, k])."""
        step = CacheStep(self.caches, slots_R, positions_R=positions_R)
        logits_RV = self.model(tokens_R1, cache=step)[:, 0]
        R, k = tokens_R1.shape[0], self.model.cfg.n_activated_experts
        routes = [step.routes[i] for i in self.learned_layers]
        routes_LR1K = torch.stack(routes) if routes else torch.zeros(0, R, 1, k, dtype=torch.long)
        return *draw(kind, logits_RV, *settings), routes_LR1K

    def _decode_greedy(self, *inputs):
        return self._decode_and_draw("greedy", *inputs)

    def _decode_sampled(self, *inputs):
        return self._decode_and_draw("sampled", *inputs)

    def _decode_truncated(self, *inputs):
        return self._decode_and_draw("truncated", *inputs)

    def _slots(self, requests: list[_Request]) -> torch.Tensor:
        return torch.tensor([r.slot for r in requests], device=self.device)

    def _settings(self, requests: list[_Request], rows: int | None = None) -> tuple[torch.Tensor, ...]:
        """`sampling.draw`'s per-row tensors (temperature, top-k, top-p, seed, counter = tokens generated so far)
        for `requests`, padded to `rows` with greedy dummy rows."""
        pad = (rows or len(requests)) - len(requests)

        def column(values, dtype):
            return torch.tensor(values + [0] * pad, dtype=dtype, device=self.device)

        return (
            column([r.params.temperature for r in requests], torch.float32),
            column([r.params.top_k for r in requests], torch.long),
            column([r.params.top_p for r in requests], torch.float32),
            column([r.seed for r in requests], torch.long),
            column([len(r.generated) for r in requests], torch.long),
        )

    def _record(
        self, requests: list[_Request], drawn: Sequence[torch.Tensor], fed_SLK: torch.Tensor | None = None
    ) -> None:
        """Append each request's drawn token (`drawn`: tokens, sampled and raw logprobs [len(requests)]); log them
        (`fed_SLK`: a decode step's routes by slot, of the previous token it fed each request, for the log; None
        after a prefill), then tell on_token."""
        tokens, logprobs, raw = (t.tolist() for t in drawn)
        for r, token, lp, raw_lp in zip(requests, tokens, logprobs, raw):
            r.generated.append(token)
            r.logprobs.append(lp)
            r.raw_logprobs.append(raw_lp)
            r.finish_reason = self._finish_reason(r)
        if self._wal is not None:
            self._wal.log_tokens(
                [
                    (r.index, len(r.generated) - 1, r.generated[-1], r.logprobs[-1], r.raw_logprobs[-1],
                     None if fed_SLK is None else fed_SLK[r.slot])
                    for r in requests
                ]
            )  # fmt: skip
        if self._on_token is not None:
            for r in requests:
                self._on_token(r.index, r.generated[-1])

    def _finish_reason(self, r: _Request) -> str | None:
        p = r.params
        if r.generated[-1] in p.stop_token_ids:
            return "stop"
        if p.stop_strings:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=False)
            cuts = [text.find(s) for s in p.stop_strings if s in text]
            if cuts:
                r.text = text[: min(cuts)]
                return "stop"
        if len(r.generated) >= p.max_new_tokens or len(r.prompt) + len(r.generated) >= self.max_len:
            return "length"
        return None

    def _completion(self, r: _Request) -> Completion:
        text = r.text
        if text is None and self.tokenizer is not None:
            text = self.tokenizer.decode(r.generated, skip_special_tokens=False)
        routes = r.routes if r.routes is not None else self._routes(r)
        return Completion(r.generated, r.logprobs, r.raw_logprobs, r.finish_reason, routes, text, r.resumed)


class _StepRoutes:
    """The routes of the learned-routing layers at every decode step, on the host, by slot: one [slots, layers, k]
    tensor per step (one copy and one scatter per step, whatever the batch), which a request reads once, when it
    finishes (`of_slot`): it was fed at every step from its first one on. Steps before the first one a running
    request needs are dropped (`drop_before`)."""

    def __init__(self, slots: int):
        self.slots, self.steps, self.base = slots, [], 0  # steps[j] is decode step base + j

    @property
    def count(self) -> int:
        return self.base + len(self.steps)

    def append(self, routes_LRK: torch.Tensor, slots_R: torch.Tensor) -> torch.Tensor:
        """Log one step's routes (row r fed slot slots_R[r]); return them by slot [slots, layers, k]."""
        L, _, K = routes_LRK.shape
        by_slot_SLK = torch.empty(self.slots, L, K, dtype=routes_LRK.dtype)
        by_slot_SLK[slots_R.cpu()] = routes_LRK.cpu().transpose(0, 1)
        self.steps.append(by_slot_SLK)
        return by_slot_SLK

    def of_slot(self, slot: int, first: int) -> torch.Tensor | None:
        """[layers, steps, k]: slot's routes from step `first` to the last; None when it was never decoded."""
        if first < 0:
            return None
        return torch.stack([s[slot] for s in self.steps[first - self.base :]], dim=1)

    def drop_before(self, step: int | None) -> None:
        """Forget the steps before `step` (None: every step so far)."""
        step = self.count if step is None else step
        del self.steps[: max(step - self.base, 0)]
        self.base = max(self.base, step)


# Guards on nn.Module bookkeeping (hook dicts, attributes absent from a module's __dict__, module types): most of a
# decode step's dynamo guards, re-checked on every call. The ones that carry meaning stay: module
# flags and config values (CONSTANT_MATCH / EQUALS_MATCH, e.g. the indexer mode), tensor metadata, identities.
_BOOKKEEPING_GUARDS = frozenset({"EMPTY_NN_MODULE_HOOKS_DICT", "NOT_PRESENT_IN_GENERIC_DICT", "TYPE_MATCH"})


def _skip_module_bookkeeping_guards(guard_entries) -> list[bool]:
    return [
        not (entry.guard_type in _BOOKKEEPING_GUARDS and entry.orig_guard.source.is_unspecialized_nn_module())
        for entry in guard_entries
    ]


def compile_decode_step(decode_forward: Callable, device: torch.device) -> Callable:
    """`torch.compile` of one decode step at fixed shapes. Per call a decode step does little work, so the fixed
    cost per call decides its speed: the graph's dynamo guards are checked without nn.Module bookkeeping (hooks
    added to the model after the first step are therefore not run by the compiled step), and on the CPU inductor
    writes its wrapper in C++ rather than Python (`cpp_wrapper`), which leaves out the Python code that launches
    each kernel (docs/generation.md, "Compiled decode")."""
    options = {"guard_filter_fn": _skip_module_bookkeeping_guards}
    if device.type == "cpu":
        options["cpp_wrapper"] = True
    return torch.compile(decode_forward, dynamic=False, options=options)


def generate_with_engine(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    batch_size: int = 16,
    progress: bool = True,
    request_seeds: Sequence[int] | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """`full_forward.generate_full_forward`'s call through the engine (what `dsv4 eval` uses): generated ids per
    prompt, EOS included when produced, `batch_size` cache slots."""
    engine = Engine(model, max_batch=max(1, min(batch_size, len(prompts))))
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop_token_ids=(eos_id,), seed=seed)
    return [c.token_ids for c in engine.generate(prompts, params, seeds=request_seeds, progress=progress)]
