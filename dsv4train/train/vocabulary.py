"""Growing a model's vocabulary for new token ids (the chat special tokens a tokenizer lacked, for SFT).

`grow_vocabulary(cfg, state_dict, new_vocab_size, seed)` is a pure function on a full (unsharded) state dict: it
returns the grown config, a new state dict and a `VocabularyGrowth` report; the inputs are not modified, and every
tensor that does not depend on the vocabulary is the very same tensor object in the result (no copy). Old rows are
kept bit for bit, so the grown model gives the same logits for the old tokens as before (plus the new columns).

The tensors with one row per token id (the only ones whose shape depends on `vocab_size`):

- `embed.weight` [V, d] and `head.weight` [V, d]: new rows are the mean of all the old rows, computed in float64
  and cast back. Why the mean: a new token's logit is then the mean of the old logits at every position, so by
  Jensen its probability is at most the mean old probability (<= 1/V) and the new model's next-token distribution
  stays close to the old one (KL <= log(1 + n_new/V)); a zero or random head row can instead give the new token
  a large share at some positions. The input side gets the same rule so a new token first reads as an "average"
  token rather than noise. This is the centre of what transformers' `resize_token_embeddings` samples (the
  old rows' mean plus noise with their covariance); here it is deterministic, with no noise, so growing the same
  checkpoint twice gives the same model. The new rows start equal to each other; they diverge at the first step
  because each new token occurs in different places and has its own targets.
- `layers.<i>.ffn.gate.tid2eid` [V, k] of the hash-routed layers (i < n_hash_layers): each new id, in id order,
  takes the k experts that hold the fewest table entries so far (old rows included), ties broken by the same seeded
  permutation of the experts as `dsv4train.models.moe.build_hash_table`. This is that function's rule when every
  token weighs 1, continued over the new ids: with the model's init `seed`, growing a table that was built without
  token counts gives exactly `build_hash_table(new_vocab_size, ...)`. A table built from a corpus histogram keeps
  its old rows, and the new ids balance the number of table entries per expert (their frequencies are unknown).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from dsv4train.config.model import ModelConfig
from dsv4train.models.model import DSV4Model

EMBED, HEAD = "embed.weight", "head.weight"
_HASH_TABLE = re.compile(r"layers\.(\d+)\.ffn\.gate\.tid2eid")
MEAN_INIT = "mean of the old rows"


@dataclass(frozen=True)
class VocabularyGrowth:
    """What `grow_vocabulary` did: the sizes, the tensors it grew (state-dict names) and the init of the new rows."""

    old_vocab_size: int
    new_vocab_size: int
    grown: tuple[str, ...]
    init: str = MEAN_INIT

    @property
    def n_new(self) -> int:
        return self.new_vocab_size - self.old_vocab_size


def hash_table_names(cfg: ModelConfig) -> list[str]:
    """State-dict names of the token -> experts tables: one per hash-routed layer (MTP's block is never hashed)."""
    return [f"layers.{i}.ffn.gate.tid2eid" for i in range(cfg.n_hash_layers)]


def vocabulary_tensor_names(cfg: ModelConfig) -> list[str]:
    return [EMBED, HEAD, *hash_table_names(cfg)]


def _expected_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: t.shape for name, t in DSV4Model(cfg).state_dict().items()}


def _check_matches(cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Same names and shapes as `DSV4Model(cfg).state_dict()`, else a ValueError naming the differences."""
    want = _expected_shapes(cfg)
    missing = sorted(set(want) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(want))
    wrong = {
        k: (tuple(state_dict[k].shape), tuple(shape))
        for k, shape in want.items()
        if k in state_dict and state_dict[k].shape != shape
    }
    if missing or unexpected or wrong:
        raise ValueError(
            f"{what} does not match a DSV4Model of vocab_size {cfg.vocab_size}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes (got, want) {dict(list(wrong.items())[:5])}; pass the full unsharded "
            "model state dict (no 'model.' prefix, no optimizer state) with the config it was trained with"
        )


def mean_rows(weight_VD: torch.Tensor, n_new: int) -> torch.Tensor:
    """`weight_VD` with `n_new` rows appended, each the float64 mean of its rows cast to its dtype."""
    mean_D = weight_VD.detach().to(torch.float64).mean(dim=0).to(weight_VD.dtype)
    return torch.cat([weight_VD.detach(), mean_D.expand(n_new, -1)], dim=0)


def _tie_break(n_experts: int, seed: int) -> np.ndarray:
    # the same draw as dsv4train.models.moe.build_hash_table, so a grown table continues the one it built
    return np.random.default_rng(seed).permutation(n_experts).astype(np.float64) * 1e-9


def grow_hash_table(table_VK: torch.Tensor, n_experts: int, n_new: int, seed: int) -> torch.Tensor:
    """`table_VK` with `n_new` rows appended: each new id, in order, gets the k distinct experts that hold the
    fewest entries so far (ties by the seeded permutation), its ids sorted as `build_hash_table` sorts them."""
    k = table_VK.shape[1]
    load_E = np.bincount(table_VK.reshape(-1).cpu().numpy(), minlength=n_experts).astype(np.float64)
    tie_break_E = _tie_break(n_experts, seed)
    new_rows = np.empty((n_new, k), dtype=np.int64)
    for row in range(n_new):
        pick = np.argpartition(load_E + tie_break_E, k - 1)[:k]
        new_rows[row] = np.sort(pick)
        load_E[pick] += 1.0
    return torch.cat([table_VK, torch.from_numpy(new_rows).to(table_VK.device, table_VK.dtype)], dim=0)


def grow_vocabulary(
    cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], new_vocab_size: int, seed: int = 0
) -> tuple[ModelConfig, dict[str, torch.Tensor], VocabularyGrowth]:
    """(config with `vocab_size=new_vocab_size`, grown state dict, report); see the module docstring for the init.

    `seed` is the one the model was initialised with (it orders ties in the hash-routing tables). Growing to the
    same size returns the same tensors; shrinking is refused (it would drop trained tokens)."""
    old = cfg.vocab_size
    if new_vocab_size < old:
        raise ValueError(
            f"cannot shrink the vocabulary from {old} to {new_vocab_size}: the model's rows for ids >= "
            f"{new_vocab_size} would be lost; use a tokenizer whose ids fit in {old} rows, or grow instead"
        )
    _check_matches(cfg, state_dict, "the state dict")
    new_cfg = replace(cfg, vocab_size=new_vocab_size)
    new_sd = dict(state_dict)
    n_new = new_vocab_size - old
    grown = vocabulary_tensor_names(cfg) if n_new else []
    for name in grown:
        if _HASH_TABLE.fullmatch(name):
            new_sd[name] = grow_hash_table(state_dict[name], cfg.n_routed_experts, n_new, seed)
        else:
            new_sd[name] = mean_rows(state_dict[name], n_new)
    _check_matches(new_cfg, new_sd, "the grown state dict")
    return new_cfg, new_sd, VocabularyGrowth(old, new_vocab_size, tuple(grown))


def growth_message(added_tokens: Sequence[str], growth: VocabularyGrowth, first_new_id: int | None = None) -> str:
    """One line for the SFT CLI saying what was added to the tokenizer and the model, and how the rows were made.

    `first_new_id`: the tokenizer id of `added_tokens[0]` (they are consecutive), when tokens were added."""
    if added_tokens:
        at = "" if first_new_id is None else f" at ids {first_new_id}..{first_new_id + len(added_tokens) - 1}"
        said = f"tokenizer lacked {len(added_tokens)} chat special tokens, added{at}: {', '.join(added_tokens)}"
    else:
        said = "tokenizer has every chat special token"
    if not growth.n_new:
        return f"{said}; model vocabulary stays {growth.old_vocab_size}"
    hashed = any(_HASH_TABLE.fullmatch(name) for name in growth.grown)
    routing = ", hash routing to the least-loaded experts" if hashed else ""
    return (
        f"{said}; model vocabulary {growth.old_vocab_size} -> {growth.new_vocab_size} "
        f"(new rows of {', '.join(growth.grown)}: embed/head {growth.init}{routing})"
    )
