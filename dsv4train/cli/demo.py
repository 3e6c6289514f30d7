"""`dsv4 demo`: the toy-scale pipeline on CPU. Today: prepare the stdlib corpus, train a BPE tokenizer, pre-train
the toy flavor and show validation loss before and after. Later issues extend it to post-training."""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from dsv4train.data.corpus import stdlib_documents
from dsv4train.data.packing import pack_documents
from dsv4train.data.tokenizer import EOS, train_tokenizer
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.train.trainer import TrainConfig, train


def prepare(docs: list[str], vocab_size: int, seq_len: int, val_fraction: float, out: Path):
    t0 = time.perf_counter()
    tok = train_tokenizer(docs, vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    ids = [e.ids for e in tok.encode_batch(docs)]
    n_val = max(1, int(len(ids) * val_fraction))
    eos = tok.token_to_id(EOS)
    train_rows, val_rows = pack_documents(ids[:-n_val], eos, seq_len), pack_documents(ids[-n_val:], eos, seq_len)
    meta = {"documents": len(docs), "val_documents": n_val, "train_tokens": train_rows.numel(),
            "val_tokens": val_rows.numel(), "vocab_size": tok.get_vocab_size(), "seconds": round(time.perf_counter() - t0, 1)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return train_rows, val_rows, meta


def demo_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="dsv4 demo", description=__doc__)
    ap.add_argument("--run-dir", default="runs/demo")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--max-docs", type=int, default=800)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    run_dir = Path(args.run_dir)
    cfg = get_flavor("toy", max_seq_len=args.seq_len)
    docs = stdlib_documents()
    random.Random(args.seed).shuffle(docs)
    docs = docs[: args.max_docs]
    print(f"[1/2] corpus: {len(docs)} Python stdlib files -> BPE tokenizer (vocab {cfg.vocab_size}) -> packed samples")
    train_rows, val_rows, meta = prepare(docs, cfg.vocab_size, args.seq_len, 0.05, run_dir / "data")
    print(f"      {meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens in {meta['seconds']} s")
    model = DSV4Model(cfg)
    model.init_weights(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[2/2] pre-train flavor 'toy' ({n_params / 1e6:.2f}M params, layers {cfg.layer_types}) "
          f"for {args.steps} steps")
    s = train(model, train_rows, val_rows, TrainConfig(steps=args.steps, seed=args.seed), run_dir)
    print("\n== summary ==")
    for k in ("steps", "tokens", "seconds", "tokens_per_sec", "val_loss_before", "val_loss_after",
              "final_train_loss", "run_dir"):
        print(f"  {k:<18} {s[k]}")
    if s["val_loss_after"] >= s["val_loss_before"]:
        print("validation loss did not fall: something is wrong")
        return 1
    return 0
