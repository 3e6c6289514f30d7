"""The DeepSeek-V4 model in plain PyTorch (arch ref §2). `model(input_ids)` -> logits [B, S, V];
`model(input_ids, with_aux=True)` -> ModelOutput with MTP logits and the auxiliary losses and counts."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from dsv4train.config.model import ModelConfig
from dsv4train.models.attention import Attention
from dsv4train.models.block import Block, BlockAux, HCHead
from dsv4train.models.documents import Documents
from dsv4train.models.kv_cache import CacheStep
from dsv4train.models.mhc import hc_head
from dsv4train.models.moe import Gate, build_hash_table
from dsv4train.models.mtp import MTPBlock
from dsv4train.models.norms import RMSNorm
from dsv4train.models.sequence import WHOLE_SEQUENCE, WholeSequence


def _owner(name: str) -> str:
    """Name of the module that owns parameter `name` (last path component), '' at the root."""
    parts = name.split(".")
    return parts[-2] if len(parts) > 1 else ""


def _within_documents(mtp_input_ids: torch.Tensor, input_ids: torch.Tensor, docs: Documents | None) -> torch.Tensor:
    """MTP's token t+1 at position t, with a document's last position given its own token (the dummy a row's last
    position gets) so that nothing of the next document enters."""
    if docs is None:
        return mtp_input_ids
    return torch.where(docs.last_in_document_BS, input_ids, mtp_input_ids)


def _per_layer(routes: dict[int, torch.Tensor] | None, layers: range) -> list[torch.Tensor | None] | None:
    return None if routes is None else [routes.get(i) for i in layers]


@dataclass
class ModelOutput:
    logits: torch.Tensor
    mtp_logits: torch.Tensor | None
    balance_loss: torch.Tensor
    indexer_loss: torch.Tensor
    expert_counts: torch.Tensor  # [n_moe_layers, E]: main layers in order, then MTP


@dataclass(frozen=True)
class LayerSlice:
    """A contiguous run of the layers, to run the model one part at a time (pipeline stages, parallel/pp.py):
    `first` also embeds the tokens, `last` also applies the head and the MTP block."""

    layers: range
    first: bool
    last: bool


def aux_losses(auxes: list[BlockAux], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance, indexer KL) summed over the blocks that have them (fp32 zeros when none does)."""
    zero = like.new_zeros((), dtype=torch.float32)
    balance = sum((a.moe.balance_loss for a in auxes if a.moe.balance_loss is not None), zero)
    indexer = sum((a.indexer_loss for a in auxes if a.indexer_loss is not None), zero)
    return balance, indexer


class DSV4Model(nn.Module):
    seq: WholeSequence = WHOLE_SEQUENCE  # replaced by context parallelism (dsv4train/parallel/cp.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, t, hashed=i < cfg.n_hash_layers) for i, t in enumerate(cfg.layer_types))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        HCHead.add_params(self, cfg.hc_mult, cfg.dim)
        self.mtp = nn.ModuleList(MTPBlock(cfg) for _ in range(cfg.n_mtp_layers))

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        mtp_input_ids: torch.Tensor | None = None,
        with_aux: bool = False,
        part: LayerSlice | None = None,
        acts: tuple = (),
        positions: torch.Tensor | None = None,
        cache: CacheStep | None = None,
        routes: dict[int, torch.Tensor] | None = None,
        with_mtp: bool = True,
        logits_from: int = 0,
    ):
        """`part`: run only that slice of the model on `acts` (see `forward_part`); the model may then hold only
        the modules of its slices (the others set to None), as a pipeline stage does. `positions` [B, S]: rows
        packed with several documents, each token's position inside its document (0 starts one; see
        models/documents.py); None = one document per row. With `positions`, the MTP input at each document's last
        token is that token itself, whatever `mtp_input_ids` holds there (nothing of the next document enters).
        `cache`: generation's prefill or decode step (models/kv_cache.py), logits only; MTP is not run.
        `routes`: keep-routing (GRPO): learned-routing layer index -> experts [B, S, k] each token goes to instead
        of the router's top-k, as generation recorded them (`Completion.routes`); a token whose row holds -1 is
        routed by the router. The routing weights are the router's scores of those experts (they keep their
        gradient). The MTP block routes itself. `with_mtp=False` leaves the MTP block out of a `with_aux` forward
        (its logits None), for a loss that does not read them (GRPO). `logits_from`: the logits only of positions
        logits_from.. (the output head and its [B, S, V] skipped where no label is read; not under context
        parallelism)."""
        if cache is not None:
            if routes is not None:
                raise ValueError("routes replay a rollout in a training forward; a cached forward records them")
            return self._forward_cached(input_ids, cache)
        self.check_routes(routes, input_ids)
        docs = None if positions is None else Documents.from_positions(positions, input_ids)
        if part is not None:
            return self.forward_part(part, acts, input_ids, docs, routes)
        x_BSND = self.embed_streams(input_ids)
        layer_routes = _per_layer(routes, range(len(self.layers)))
        x_BSND, auxes = self.run_layers(x_BSND, input_ids, self.layers, docs, layer_routes)
        if logits_from and self.seq.shards > 1:
            raise ValueError("logits_from cuts whole rows: it cannot be used under context parallelism")
        logits = self.final(x_BSND[:, logits_from:])
        if not with_aux:
            return logits

        mtp_logits = None
        if len(self.mtp) and with_mtp:
            if mtp_input_ids is None and self.seq.shards > 1:
                raise ValueError(
                    "under context parallelism pass mtp_input_ids (token t+1 at position t, e.g. the "
                    "labels): this shard's last position needs the next shard's first token"
                )
            if mtp_input_ids is None:  # token t+1 at position t; the last position gets a dummy
                mtp_input_ids = torch.cat((input_ids[:, 1:], input_ids[:, -1:]), dim=1)
            next_BSD = self.embed(_within_documents(mtp_input_ids, input_ids, docs))
            mtp_logits, aux = self.mtp_logits(x_BSND, next_BSD, docs)
            auxes.append(aux)
        balance, indexer = aux_losses(auxes, logits)
        counts = torch.stack([a.moe.counts_E for a in auxes])
        if len(self.mtp) and not with_mtp:  # the MTP blocks' MoE layers routed nothing (one row each, as ever)
            counts = torch.cat([counts, counts.new_zeros(len(self.mtp), counts.shape[1])])
        return ModelOutput(logits, mtp_logits, balance, indexer, counts)

    def forward_part(
        self,
        part: LayerSlice,
        acts: tuple,
        input_ids: torch.Tensor,
        docs: Documents | None = None,
        routes: dict[int, torch.Tensor] | None = None,
    ) -> tuple[tuple, list[BlockAux]]:
        """One slice of the forward. acts: (next token ids,) for the first slice (with MTP; else ()), otherwise
        what the previous slice returned: (streams[, next-token embedding]). Returns what the next slice takes
        (streams [B, S, N, d] in fp32[, the next-token embedding]) or, for the last slice, (logits[, MTP logits])
        in fp32, and the auxiliary outputs of its blocks (the MTP block's last)."""
        with_mtp = self.cfg.n_mtp_layers > 0
        if part.first:
            x_BSND = self.embed_streams(input_ids)
            next_BSD = self.embed(_within_documents(acts[0], input_ids, docs)) if with_mtp else None
        else:
            x_BSND, next_BSD = acts[0], (acts[1] if with_mtp else None)
        layers = [self.layers[i] for i in part.layers]
        x_BSND, auxes = self.run_layers(x_BSND, input_ids, layers, docs, _per_layer(routes, part.layers))
        if not part.last:
            return (x_BSND.float(), *([next_BSD.float()] if with_mtp else [])), auxes
        outs = [self.final(x_BSND).float()]
        if with_mtp:
            mtp_logits, aux = self.mtp_logits(x_BSND, next_BSD, docs)
            outs.append(mtp_logits.float())
            auxes.append(aux)
        return tuple(outs), auxes

    def _forward_cached(self, input_ids: torch.Tensor, cache: CacheStep) -> torch.Tensor:
        # a decode step's ids are the tokens just sampled: checking them would cost a host sync and split the
        # compiled graph of a step (Engine(compile=True))
        x_BSND = self.embed_streams(input_ids, check=cache.prefill)
        for i, layer in enumerate(self.layers):
            x_BSND, aux = layer(x_BSND, input_ids, None, cache.layer(i))
            cache.routes.append(aux.moe.routes_BSK)
        if cache.prefill and not cache.all_logits:  # the next token's logits only: [R, 1, V], not [R, L, V]
            rows_R = torch.arange(x_BSND.shape[0], device=x_BSND.device)
            x_BSND = x_BSND[rows_R, cache.lengths_R - 1].unsqueeze(1)
        return self.final(x_BSND)

    # The pieces of `forward`, also run one by one by `forward_part`.
    def embed_streams(self, input_ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """Token ids [B, S] -> the hc_mult residual streams [B, S, N, d], each a copy of the embedding."""
        cfg = self.cfg
        if check and (input_ids.max() >= cfg.vocab_size or input_ids.min() < 0):
            raise ValueError(
                f"input_ids must lie in [0, {cfg.vocab_size}); got range "
                f"[{int(input_ids.min())}, {int(input_ids.max())}]"
            )
        emb_BSD = self.embed(input_ids)
        return emb_BSD.unsqueeze(-2).expand(-1, -1, cfg.hc_mult, -1).contiguous()

    @staticmethod
    def run_layers(
        x_BSND: torch.Tensor,
        input_ids: torch.Tensor,
        layers,
        docs: Documents | None = None,
        routes: list[torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, list[BlockAux]]:
        """`routes`: one entry per layer of `layers` (None: the router chooses), see `forward`."""
        auxes: list[BlockAux] = []
        for layer, layer_routes in zip(layers, routes or [None] * len(layers)):
            x_BSND, aux = layer(x_BSND, input_ids, docs, routes_BSK=layer_routes)
            auxes.append(aux)
        return x_BSND, auxes

    @property
    def learned_routing_layers(self) -> list[int]:
        """The indices of the MoE layers whose router learns (hash layers route by token id): the layers whose
        routes generation records and keep-routing replays."""
        return [i for i, layer in enumerate(self.layers) if not layer.ffn.gate.hashed]

    def check_routes(self, routes: dict[int, torch.Tensor] | None, input_ids: torch.Tensor) -> None:
        """A ValueError naming the layer whose replayed routes cannot be used."""
        if routes is None:
            return
        cfg = self.cfg
        shape = (*input_ids.shape, cfg.n_activated_experts)
        for i, routes_BSK in routes.items():
            if not isinstance(i, int) or not 0 <= i < cfg.n_layers:
                raise ValueError(f"routes has layer {i!r}: the model's layers are 0..{cfg.n_layers - 1}")
            if i < cfg.n_hash_layers:
                raise ValueError(f"routes has layer {i}, a hash-routed layer: it routes by token id, leave it out")
            if tuple(routes_BSK.shape) != shape or routes_BSK.dtype != torch.long:
                raise ValueError(
                    f"routes[{i}] must be int64 {list(shape)} (batch, sequence, experts per token), got "
                    f"{routes_BSK.dtype} {list(routes_BSK.shape)}"
                )
            if routes_BSK.numel() and (routes_BSK.min() < -1 or routes_BSK.max() >= cfg.n_routed_experts):
                raise ValueError(
                    f"routes[{i}] holds experts outside [0, {cfg.n_routed_experts}) (or -1: the router chooses)"
                )
            if not torch.equal((routes_BSK < 0).all(-1), (routes_BSK < 0).any(-1)):
                raise ValueError(f"routes[{i}]: a token is replayed whole or not at all (-1 in all k places)")

    def final(self, x_BSND: torch.Tensor) -> torch.Tensor:
        """Final streams -> logits [B, S, V]: the hc head collapse, the norm and the output head."""
        cfg = self.cfg
        y = hc_head(x_BSND, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, cfg.hc_eps, cfg.norm_eps)
        return self.head(self.norm(y))

    def mtp_logits(
        self, x_BSND: torch.Tensor, next_emb_BSD: torch.Tensor, docs: Documents | None = None
    ) -> tuple[torch.Tensor, BlockAux]:
        h, aux = self.mtp[0].forward_mtp(x_BSND, next_emb_BSD, docs)
        return self.head(h), aux

    # ------------------------------------------------------------------ switches
    def set_indexer_mode(self, mode: str) -> None:
        """'dense' (attend to every visible compressed entry) or 'sparse' (indexer top-k) in every CSA layer."""
        if mode not in ("dense", "sparse"):
            raise ValueError(f"indexer mode must be 'dense' or 'sparse', got {mode!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.indexer_mode = mode

    def set_indexer_kl(self, enabled: bool) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.indexer_kl = enabled

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self, seed: int = 0, token_counts=None) -> None:
        """Deterministic init: each tensor draws from its own generator seeded by (seed, name), so the values do
        not depend on module order, device or how the model is later sharded. Works after `to_empty()`.

        Choices (V4 does not publish init): linear/embedding/expert weights N(0, init_std); mHC fn
        N(0, hc_init_std), base 0, scale hc_init_scale (the mHC paper's 0.01 gating factor); norms 1;
        sinks, compressor position biases and router biases 0; hash tables from `build_hash_table`."""
        cfg = self.cfg
        for name, p in self.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            leaf = name.rsplit(".", 1)[-1]
            if leaf.endswith("_base") or leaf in ("attn_sink", "ape"):
                p.zero_()
            elif leaf.endswith("_scale"):
                p.fill_(cfg.hc_init_scale)
            elif leaf.endswith("_fn"):
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.hc_init_std)
            elif leaf == "weight" and _owner(name).endswith("norm"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * cfg.init_std)
        for m in (g for g in self.modules() if isinstance(g, Gate)):
            if m.hashed:
                m.tid2eid.copy_(
                    build_hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, seed, token_counts)
                )
            else:
                m.bias.zero_()
