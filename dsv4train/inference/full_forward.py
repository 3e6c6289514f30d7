"""Batched generation by repeated full forwards: every new token costs one forward of the whole sequence so far.

This is O(n²) in the generated length and has no KV cache on purpose: it is the reference the generation engine
(hybrid KV cache, issue 15) is tested against, and what `dsv4 eval` uses until that engine lands. It calls the
model exactly as training does, `model(input_ids_BL)` -> logits [B, L, V], so it needs nothing from the model but
that call and `model.cfg.max_seq_len`.

Batching. Prompts of different lengths share a forward as right-padded rows (padded with EOS, the V4 pad token), and
each row's next token is read from the logits at that row's own last real position. Under causal attention a
position never sees the positions after it, so a row's padding never reaches its real positions; the sliding
window, the CSA/HCA compressors (an entry is visible only after its block is complete) and the indexer's top-k are
causal too, the MoE routes each token on its own, and the balance loss is not computed at inference: nothing couples
one row to another or to its own padding. A request's continuation is therefore the same alone or in any batch (up
to fp32 noise from different matrix shapes; tests/unit/test_generate_full_forward.py checks it). Prompts are sorted
by length before they are cut into batches (less padding); results come back in the order given. A row that is done
(EOS or its token limit) leaves the batch, so later forwards only run the rows still generating.

Decoding. Greedy (argmax, the first index on ties) when `temperature == 0`; otherwise a sample from
softmax(logits / temperature) drawn with the request's own CPU `torch.Generator`, seeded from (`seed`, the request's
index in `prompts`) or from `request_seeds`. A request's draws therefore depend on its seed and its own logits only,
never on `batch_size`, on the other prompts or on the order in which rows finish.

Lengths. A request generates at most `max_new_tokens` tokens and never grows past `model.cfg.max_seq_len` tokens in
all (then it stops without EOS). An empty prompt, or one longer than `max_seq_len - 1` (no room for a single new
token), is refused with a ValueError naming it, before any forward runs. The result of a request is its generated
ids without the prompt, up to and including EOS when it produced one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import nn
from tqdm import tqdm

DEFAULT_BATCH_SIZE = 16


def request_seed(seed: int, index: int) -> int:
    """The sampling seed of request `index` under run seed `seed`: a hash, so (0, 1) and (1, 0) do not collide."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "big") >> 1


def check_requests(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, batch_size: int, max_seq_len: int
) -> None:
    """A ValueError naming the first problem with the arguments, before any work is done."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (temperature >= 0.0 and temperature != float("inf")):  # also refuses NaN
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to continue")
        if len(prompt) > max_seq_len - 1:
            raise ValueError(
                f"prompt {i} has {len(prompt)} tokens, but the model's max_seq_len is {max_seq_len}: a prompt may "
                f"have at most {max_seq_len - 1} tokens to leave room for one new token; shorten it"
            )


def right_padded(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] with each row left-aligned and padded with `pad_id` on the right, each row's last real index [B])."""
    longest = max(len(r) for r in rows)
    ids_BL = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    for b, row in enumerate(rows):
        ids_BL[b, : len(row)] = torch.as_tensor(row, dtype=torch.long)
    last_B = torch.tensor([len(r) - 1 for r in rows], dtype=torch.long)
    return ids_BL.to(device), last_B.to(device)


def next_tokens(logits_BV: torch.Tensor, temperature: float, generators: Sequence[torch.Generator | None]) -> list[int]:
    """One token per row: argmax when temperature is 0, else a draw from softmax(logits / T) with the row's own
    generator (on CPU, so the draws are the same whatever device the model runs on)."""
    if temperature == 0.0:
        return logits_BV.argmax(dim=-1).tolist()
    probs_BV = torch.softmax(logits_BV.float().cpu() / temperature, dim=-1)
    return [int(torch.multinomial(p_V, 1, generator=g)) for p_V, g in zip(probs_BV, generators)]


def _model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _generate_batch(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    limits: Sequence[int],
    eos_id: int,
    temperature: float,
    generators: Sequence[torch.Generator | None],
    device: torch.device,
) -> list[list[int]]:
    """The continuations of one batch of prompts; request k stops at EOS or after `limits[k]` tokens."""
    sequences = [list(p) for p in prompts]
    generated: list[list[int]] = [[] for _ in prompts]
    active = [k for k, limit in enumerate(limits) if limit > 0]
    while active:
        ids_BL, last_B = right_padded([sequences[k] for k in active], eos_id, device)
        logits_BLV = model(ids_BL)
        logits_BV = logits_BLV[torch.arange(len(active), device=device), last_B]  # each row's own last position
        still_active = []
        for k, token in zip(active, next_tokens(logits_BV, temperature, [generators[k] for k in active])):
            sequences[k].append(token)
            generated[k].append(token)
            if token != eos_id and len(generated[k]) < limits[k]:
                still_active.append(k)
        active = still_active
    return generated


@torch.no_grad()
def generate_full_forward(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_id: int,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: bool = True,
    request_seeds: Sequence[int] | None = None,
) -> list[list[int]]:
    """The generated ids of each prompt (without the prompt; through EOS when produced), in the order given.

    Greedy when `temperature == 0`, else sampled with request i's generator seeded by `request_seeds[i]`, or by
    `request_seed(seed, i)` when none are given (module docstring). The model runs in eval mode under no_grad and
    is put back in the mode it was in; its indexer mode is used as it is set (`DSV4Model.set_indexer_mode`).
    `progress`: a tqdm bar of finished requests."""
    max_seq_len = int(model.cfg.max_seq_len)
    check_requests(prompts, max_new_tokens, temperature, batch_size, max_seq_len)
    if request_seeds is not None and len(request_seeds) != len(prompts):
        raise ValueError(f"request_seeds has {len(request_seeds)} seeds for {len(prompts)} prompts; give one each")
    seeds = list(request_seeds) if request_seeds is not None else [request_seed(seed, i) for i in range(len(prompts))]
    limits = [min(max_new_tokens, max_seq_len - len(p)) for p in prompts]
    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    results: list[list[int]] = [[] for _ in prompts]
    was_training = model.training
    model.eval()
    try:
        with tqdm(total=len(prompts), desc="generate", unit="req", disable=not progress) as bar:
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                generators = [None if temperature == 0.0 else torch.Generator().manual_seed(seeds[i]) for i in chunk]
                outs = _generate_batch(
                    model,
                    [prompts[i] for i in chunk],
                    [limits[i] for i in chunk],
                    eos_id,
                    temperature,
                    generators,
                    device,
                )
                for i, out in zip(chunk, outs):
                    results[i] = out
                bar.update(len(chunk))
    finally:
        model.train(was_training)
    return results
