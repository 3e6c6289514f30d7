"""From scored rollouts to the Learner's micro-batches (train/learner.py, train/losses.py keys).

A rollout of prompt p (P tokens) and completion c (C tokens, the stop token included) becomes one row of P + C − 1
input tokens, `input_ids` = (p + c)[:−1] and `labels` = (p + c)[1:] with IGNORE over the prompt: the label at
position P − 1 + j is c[j], so the row's targets are exactly the completion's tokens, in order. Per position, next
to the labels:

- `old_logprobs`: the rollout's log-prob of that label under the distribution it was sampled from (π_old);
- `advantages`: the sequence's advantage (the same in every position of the row, padding included);
- `loss_weights`: the aggregation's per-token weight (`aggregation_weights`);
- `beta`: the KL weight of the sequence's domain;
- `ref_logprobs` (with a reference model): filled in by the controller;
- `routes.<layer>` [B, S, k]: the experts the rollout routed each input token to, in every learned-routing MoE
  layer (keep-routing; the engine records exactly the P + C − 1 tokens it fed through the model).

Rows are right-padded to the micro-batch's longest with EOS ids, IGNORE labels and −1 routes (the router's choice):
attention is causal, so padding never changes a real position.

**Aggregation as weights.** The Learner divides a step's summed loss by N, the number of target tokens of the whole
step. Every aggregation of policy_loss.py is such a sum with a weight per token of sequence i (|o_i| its tokens,
B the step's sequences, H the horizon): token-mean 1; seq-mean-token-mean N / (B' |o_i|) with B' the sequences that
have a token; seq-mean-token-sum N / B; seq-mean-token-sum-norm N / (B H). So Σ w ℓ / N is the aggregated loss, for
any cut of the step into micro-batches (and over data ranks, with the global N and B).

**Over data ranks** (torchrun layouts). Every rank builds the step's micro-batches from the same samples and trains
its share (`data_rank_share`): a contiguous run of ⌈M / R⌉ of the M micro-batches per data rank, completed by
padding micro-batches (no targets; train/learner.py "Padding") where M does not divide, so every rank runs as many
forward/backward passes. Each micro-batch is the one a single process trains, so its numbers are too."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsv4train.posttrain.grpo.policy_loss import AGGREGATIONS
from dsv4train.posttrain.grpo.rollout import Rollout
from dsv4train.train.losses import IGNORE, ROUTES_PREFIX


@dataclass(frozen=True)
class ScoredRollout:
    rollout: Rollout
    task: str
    reward: float  # the shaped reward the advantage is computed from
    advantage: float
    beta: float


def aggregation_weights(lengths: Sequence[int], mode: str, horizon: int | None = None) -> list[float]:
    """The per-token weight of each sequence (module docstring) for one optimizer step's sequences."""
    if mode not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; use one of {AGGREGATIONS}")
    if not lengths:
        raise ValueError("no sequences: an optimizer step needs at least one")
    if any(n < 0 for n in lengths):
        raise ValueError(f"sequence lengths must be >= 0, got {list(lengths)}")
    norm = mode == "seq-mean-token-sum-norm"
    if norm and (not isinstance(horizon, int) or isinstance(horizon, bool) or horizon < 1):
        raise ValueError(f"mode 'seq-mean-token-sum-norm' needs horizon, a positive integer, got {horizon!r}")
    if not norm and horizon is not None:
        raise ValueError(f"horizon is only used by mode 'seq-mean-token-sum-norm'; pass None with mode {mode!r}")
    n_tokens, n_seqs = sum(lengths), len(lengths)
    if mode == "token-mean":
        return [1.0] * n_seqs
    if mode == "seq-mean-token-mean":
        nonempty = sum(1 for n in lengths if n > 0)
        return [n_tokens / (nonempty * n) if n > 0 else 0.0 for n in lengths]
    if mode == "seq-mean-token-sum":
        return [n_tokens / n_seqs] * n_seqs
    return [n_tokens / (n_seqs * horizon)] * n_seqs


def micro_batches(
    samples: Sequence[ScoredRollout],
    weights: Sequence[float],
    rows_per_batch: int,
    learned_layers: Sequence[int],
    pad_id: int,
) -> list[dict[str, torch.Tensor]]:
    """The samples in order, `rows_per_batch` rows per micro-batch (module docstring), on the CPU."""
    if len(weights) != len(samples):
        raise ValueError(f"{len(weights)} weights for {len(samples)} samples")
    batches = []
    for start in range(0, len(samples), rows_per_batch):
        chunk = list(zip(samples[start : start + rows_per_batch], weights[start : start + rows_per_batch]))
        batches.append(_micro_batch(chunk, learned_layers, pad_id))
    return batches


def _micro_batch(chunk, learned_layers: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
    rows = [s.rollout.prompt_ids + s.rollout.completion.token_ids for s, _ in chunk]
    S = max(len(r) for r in rows) - 1
    B = len(chunk)
    k = next((s.rollout.completion.routes[i].shape[-1] for s, _ in chunk for i in learned_layers), 1)
    batch = {
        "input_ids": torch.full((B, S), pad_id, dtype=torch.long),
        "labels": torch.full((B, S), IGNORE, dtype=torch.long),
        "old_logprobs": torch.zeros(B, S),
        "advantages": torch.zeros(B, S),
        "loss_weights": torch.zeros(B, S),
        "beta": torch.zeros(B, S),
        **{f"{ROUTES_PREFIX}{i}": torch.full((B, S, k), -1, dtype=torch.long) for i in learned_layers},
    }
    for b, ((s, weight), row) in enumerate(zip(chunk, rows)):
        c = s.rollout.completion
        P, L = len(s.rollout.prompt_ids), len(row) - 1
        if len(c.token_ids) == 0:
            raise ValueError("a rollout without generated tokens cannot be trained on")
        batch["input_ids"][b, :L] = torch.tensor(row[:-1])
        batch["labels"][b, P - 1 : L] = torch.tensor(c.token_ids)
        batch["old_logprobs"][b, P - 1 : L] = torch.tensor(c.logprobs)
        batch["advantages"][b] = s.advantage
        batch["loss_weights"][b, P - 1 : L] = weight
        batch["beta"][b] = s.beta
        for i in learned_layers:
            if i not in c.routes:
                raise ValueError(
                    f"the rollout recorded no routes for learned-routing layer {i} (it has {sorted(c.routes)}): "
                    "keep-routing needs the routes of every such layer; generate with the same model"
                )
            routes = c.routes[i]
            if routes.shape[0] != L:
                raise ValueError(
                    f"layer {i}: the rollout recorded routes for {routes.shape[0]} tokens, the row has {L} inputs"
                )
            batch[f"{ROUTES_PREFIX}{i}"][b, :L] = routes
    return batch


def data_rank_share(
    batches: Sequence[dict[str, torch.Tensor]], rank: int, n_ranks: int
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(data rank `rank`'s micro-batches: [rank·m, (rank+1)·m) of the step's M, m = ⌈M / n_ranks⌉; the padding that
    brings it to m: one-row copies of the step's last micro-batch with every label IGNORE)."""
    m = -(-len(batches) // n_ranks)
    mine = list(batches[rank * m : (rank + 1) * m])
    return mine, [_padding(batches[-1]) for _ in range(m - len(mine))]


def _padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch of one row of `batch` without targets: it runs like any other and adds nothing."""
    pad = {k: v[:1].clone() for k, v in batch.items()}
    pad["labels"] = torch.full_like(pad["labels"], IGNORE)
    return pad
