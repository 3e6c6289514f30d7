"""Supervised fine-tuning (`dsv4 sft`): a pre-trained model on chat records, loss on what the assistant generates.
`sft(cfg)` reads top to bottom:

the model and tokenizer of `init` (chat special tokens added if the tokenizer lacks them, the model's rows grown, and
said so) -> records read and validated (bad ones counted) -> tokenized with target masks -> samples longer than a row
dropped or truncated (counted) -> packed into document-masked rows -> the same steps, callbacks, checkpoints and
resume as pre-training (train/trainer.py `run_steps`), with the next-token loss over target tokens only (token
weighted, train/learner.py) -> summary.json with the data report.

The run directory is like pre-training's (config.resolved.yaml, metrics.jsonl, checkpoints/, summary.json) plus the
tokenizer.json it trained with, so `load_pretrained`, `dsv4 convert to-hf` and a later `dsv4 sft sft.init=<this run>`
find both. Running the same command again resumes from the newest checkpoint."""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from dsv4train.config.errors import ConfigError
from dsv4train.config.sft import SFTConfig, SFTDataConfig, SFTOptions
from dsv4train.data.chat import EOS, conversation_to_dict
from dsv4train.data.loader import rank_rows
from dsv4train.data.sft import SFTBatches, SFTSample, fit_to_length, read_sft_records, tokenize_samples
from dsv4train.data.tokenizer import (
    TOKENIZER_JSON,
    ensure_chat_tokens,
    find_tokenizer_json,
    load_tokenizer,
    required_vocab_size,
)
from dsv4train.models.model import DSV4Model
from dsv4train.observability.run_dir import open_run_dir, write_snapshot
from dsv4train.observability.trackers import build_trackers
from dsv4train.parallel.dims import ParallelDims
from dsv4train.parallel.runtime import ParallelRuntime
from dsv4train.train.callbacks import Loop, default_callbacks
from dsv4train.train.pretrained import load_pretrained
from dsv4train.train.run_files import run_tokenizer
from dsv4train.train.trainer import placement, print_summary, resumed_loop, run_and_summarise, same_run_dir
from dsv4train.train.vocabulary import grow_vocabulary, growth_message
from dsv4train.utils.device import pick_device, seed_everything
from dsv4train.utils.dist import env_world_size, init_distributed
from dsv4train.utils.signals import PreemptionFlag, catch_preemption


def sft(cfg: SFTConfig, resolved_yaml: str | None = None) -> dict:
    with catch_preemption() as preemption:  # before anything else, so set-up is covered too
        return _sft(cfg, resolved_yaml, preemption)


def _sft(cfg: SFTConfig, resolved_yaml: str | None, preemption: PreemptionFlag) -> dict:
    t = cfg.train
    tokenizer, model, vocab_note = load_init(cfg.sft.init, cfg.data.tokenizer, cfg.seed, cfg.sft.max_seq_len)
    if t.seq_len > model.cfg.max_seq_len:
        raise ConfigError(
            f"train.seq_len: {t.seq_len} exceeds the model's max_seq_len {model.cfg.max_seq_len}; lower it, or raise "
            f"the bound with sft.max_seq_len={t.seq_len}"
        )
    dims = ParallelDims.from_config(cfg.parallel)
    dims.validate(env_world_size(), model.cfg, t.seq_len, t.micro_batch_size)  # before any process-group work
    device = init_distributed(pick_device(t.device), cfg.parallel.timeout_s)
    rt = ParallelRuntime(dims, device)
    run_dir = open_run_dir(same_run_dir(cfg, rt))
    dtype = torch.bfloat16 if cfg.precision.compute_dtype == "bfloat16" else torch.float32
    seed_everything(cfg.seed)

    data = build_sft_data(cfg.data, cfg.sft, tokenizer, t.seq_len, t.micro_batch_size * rt.data_ranks, t.eval_batches)
    n_params = sum(p.numel() for p in model.parameters())
    loop, resume_from, removed, fresh = resumed_loop(cfg, model.to(device), rt, dtype, run_dir, data.train, preemption)
    config_dict = asdict(cfg)
    if rt.is_main:
        write_snapshot(run_dir, resolved_yaml or OmegaConf.to_yaml(config_dict), loop.start_step)
        tokenizer.save(str(run_dir / TOKENIZER_JSON))
        _print_start(cfg, n_params, loop, data, vocab_note, resume_from, removed, fresh)

    trackers = build_trackers(cfg.tracker, run_dir, config_dict) if rt.is_main else None
    val = [rank_rows(b, rt.data_rank, rt.data_ranks) for b in data.val_batches]
    callbacks = default_callbacks(cfg, val, trackers, desc="sft")
    summary = run_and_summarise(
        loop,
        callbacks,
        lambda: rank_rows(data.train.next_batch(), rt.data_rank, rt.data_ranks),
        extra_summary={"data": data.report, "tokenizer": vocab_note},
    )
    if rt.is_main:
        print_summary(summary, "sft", leave_out=("data", "tokenizer"))  # both printed at the start
    return summary


# ---------------------------------------------------------------------------------------------------- the model
def load_init(
    init: str, tokenizer_path: str, seed: int, max_seq_len: int = 0, key: str = "sft.init"
) -> tuple[Tokenizer, DSV4Model, str]:
    """(tokenizer with every chat special token, model whose vocabulary covers it, one line saying what was done).

    The tokenizer is `tokenizer_path`, else the one that came with `init`: its own tokenizer.json (an SFT run, an HF
    export, a dsv4 folder holding one), or the data folder of the pre-training run it is. Tokens it lacks are added
    at new ids and the model's embedding, head and hash-routing rows grown (train/vocabulary.py); ids beyond the
    model's rows otherwise are refused: the tokenizer is not the model's. `max_seq_len` > the model's raises the
    length bound in its config (nothing else about the model changes). `key`: the config key the errors name."""
    path = Path(init)
    if not path.exists():
        raise FileNotFoundError(
            f"{key}={init}: no such file or folder (a dsv4 folder, a run directory or an HF export)"
        )
    tokenizer = load_tokenizer(_init_tokenizer(path, tokenizer_path, key))
    added = ensure_chat_tokens(tokenizer)
    model = load_pretrained(path)
    rows = required_vocab_size(tokenizer)
    if rows > model.cfg.vocab_size and not added:
        raise ConfigError(
            f"the tokenizer has ids up to {rows - 1} but the model {init} has {model.cfg.vocab_size} embedding rows: "
            "they do not belong together; set data.tokenizer to the tokenizer the model was trained with"
        )
    new_cfg, new_sd, growth = grow_vocabulary(model.cfg, model.state_dict(), max(rows, model.cfg.vocab_size), seed)
    note = growth_message(added, growth, tokenizer.token_to_id(added[0]) if added else None)
    if max_seq_len > new_cfg.max_seq_len:
        note += f"; max_seq_len {new_cfg.max_seq_len} -> {max_seq_len}"
        new_cfg = replace(new_cfg, max_seq_len=max_seq_len)
    if new_cfg != model.cfg:
        model = DSV4Model(new_cfg)
        model.load_state_dict(new_sd)
    return tokenizer, model.train(), note


def _init_tokenizer(init: Path, given: str, key: str) -> Path:
    if given:
        return find_tokenizer_json(given)
    if (init / TOKENIZER_JSON).is_file():  # an HF export or a dsv4 folder that holds one
        return init / TOKENIZER_JSON
    found, why = run_tokenizer(init)  # a run (SFT runs keep theirs; pre-training runs: their data folder's)
    if found is None:
        raise ConfigError(
            f"{key}={init}: no tokenizer found ({why}); set the tokenizer key (data.tokenizer, grpo.tokenizer) to "
            "the tokenizer.json the model was trained with (a `dsv4 data prepare` folder holds one)"
        )
    return found


# ---------------------------------------------------------------------------------------------------- the data
@dataclass
class SFTData:
    train: SFTBatches
    val_batches: list[dict]  # global micro-batches (every data rank's rows), the same at every evaluation
    report: dict


def build_sft_data(
    cfg: SFTDataConfig, opts: SFTOptions, tokenizer: Tokenizer, seq_len: int, global_rows: int, eval_batches: int
) -> SFTData:
    """Records -> validated samples -> tokens with targets -> rows of seq_len, for training and validation."""
    eos_id = tokenizer.token_to_id(EOS)
    samples, bad = read_sft_records(cfg.train, opts.on_bad_record)
    report: dict = {"train_files": bad.to_dict()}
    if cfg.val:
        train_samples = samples
        val_samples, val_bad = read_sft_records(cfg.val, opts.on_bad_record)
        report["val_files"] = val_bad.to_dict()
    else:
        train_samples, val_samples = _split(samples, cfg.val_fraction)
    train_tok, train_fit = fit_to_length(tokenize_samples(train_samples, tokenizer, eos_id), seq_len, opts.too_long)
    val_tok, val_fit = fit_to_length(tokenize_samples(val_samples, tokenizer, eos_id), seq_len, opts.too_long)
    if not val_tok:
        raise ConfigError(
            "no validation samples are left (data.val empty, or all of them too long / bad): add records, raise "
            "data.val_fraction, or list files in data.val"
        )
    train = SFTBatches(train_tok, seq_len, global_rows, eos_id, seed=cfg.seed)
    val_stream = SFTBatches(val_tok, seq_len, global_rows, eos_id, seed=0)
    n_val = min(eval_batches, max(1, val_stream.n_rows // global_rows))
    report.update(
        train_samples=len(train_tok),
        val_samples=len(val_tok),
        train_too_long=train_fit.to_dict(),
        val_too_long=val_fit.to_dict(),
        train_rows=train.n_rows,
        row_fill=round(train.fill, 4),
        train_target_tokens=train.n_targets,
        domains=_count(s.domain for s in train_samples),
        modes=_count(s.mode for s in train_samples),
    )
    return SFTData(train, [val_stream.next_batch() for _ in range(n_val)], report)


def _split(samples: list[SFTSample], val_fraction: float) -> tuple[list[SFTSample], list[SFTSample]]:
    """A fixed pick of about `val_fraction` of the samples for validation, by a hash of each record's content (so it
    does not depend on file order, data.seed or which other records are there)."""
    train, val = [], []
    for s in samples:
        key = json.dumps([conversation_to_dict(s.conversation), s.mode], sort_keys=True).encode()
        draw = int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64
        (val if draw < val_fraction else train).append(s)
    return train, val


def _count(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))


# ---------------------------------------------------------------------------------------------------- reporting
def _print_start(cfg: SFTConfig, n: int, loop: Loop, data: SFTData, vocab_note: str, resume_from, removed, fresh):
    t, r = cfg.train, data.report
    dims = loop.rt.dims
    print(
        f"dsv4 sft: {cfg.sft.init} ({n / 1e6:.2f}M params) on {placement(loop)}, {t.steps} steps of "
        f"{t.micro_batch_size * dims.data_ranks}x{t.grad_accum} rows of {t.seq_len} tokens, run dir {loop.run_dir}"
    )
    print(f"  {vocab_note}")
    bad = r["train_files"]
    first_bad = f" (first: {bad['first_bad'][0]})" if bad["bad"] else ""
    print(
        f"  data: {bad['records']} records, {bad['bad']} bad{first_bad}"
        f"; {r['train_samples']} train / {r['val_samples']} val samples in {r['train_rows']} rows "
        f"({r['row_fill']:.0%} filled), {r['train_too_long']['too_long']} too long "
        f"({cfg.sft.too_long}), domains {r['domains']}, modes {r['modes']}"
    )
    if removed:
        print(f"  removed incomplete checkpoint writes: {', '.join(removed)}")
    if resume_from is not None:
        print(f"  resuming from {resume_from}" + (" (optimizer state starts fresh)" if fresh else ""))
    sys.stdout.flush()
