"""`dsv4 generate MODEL --prompt TEXT [--chat] [--mode chat|think] [--max-new-tokens N] [--temperature T] [--top-p P]
[--top-k K] [--seed S] [--tokenizer PATH] [--device auto|cpu|cuda]`: continue TEXT with MODEL through the generation
engine (KV cache), printing the text as it is generated.

MODEL: a dsv4 folder, a training run directory (its newest checkpoint), one `checkpoints/step_<N>/` folder or an HF
export; its tokenizer comes with it (or --tokenizer). Without --chat the prompt is raw text (BOS first); with --chat
it is one user turn of the V4 chat format (arch ref §9.4), answered in --mode (chat: the answer at once; think:
reasoning in <think> ... </think> first). Generation stops at EOS, at --max-new-tokens, or at the model's
max_seq_len. Greedy at --temperature 0 (the default); sampling is seeded by --seed. After the text, one line
reports the finish reason and tokens/s. Exit status: 0 done, 2 a mistake in the arguments or MODEL."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

PROG = "dsv4 generate"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "model", type=Path, help="a dsv4 folder, a run directory, a checkpoints/step_<N> folder, an HF export"
    )
    p.add_argument("--prompt", required=True, help="the text to continue (with --chat: the user's message)")
    p.add_argument("--chat", action="store_true", help="render the prompt as a user turn of the chat format")
    p.add_argument("--mode", choices=("chat", "think"), default="chat", help="with --chat: the reasoning mode")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", default="", help="a tokenizer.json or a folder holding one (default: MODEL's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def prompt_ids(tokenizer, text: str, chat_format: bool, mode: str) -> list[int]:
    """The prompt's token ids: raw text after BOS, or one user turn rendered up to the assistant's opening."""
    from dsv4train.data import chat
    from dsv4train.posttrain.evaluation import prompt_text

    rendered = prompt_text(text, mode) if chat_format else chat.BOS + text
    return tokenizer.encode(rendered, add_special_tokens=False).ids


class TextStream:
    """Prints a request's text as its tokens arrive: decodes all of them and writes what is new, so tokens that
    only make a character together (byte-level BPE) print once they do."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], ""

    def __call__(self, _request: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return
        self._show(text)

    def finish(self) -> None:
        """Print what is left, an incomplete character included (a generation may end inside one)."""
        self._show(self.tokenizer.decode(self.ids, skip_special_tokens=False))

    def _show(self, text: str) -> None:
        self.out.write(text[len(self.shown) :])
        self.out.flush()
        self.shown = text


def generate_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dsv4train.cli.model_args import checked_model_and_device
    from dsv4train.config.errors import ConfigError
    from dsv4train.data import chat
    from dsv4train.inference.engine import Engine
    from dsv4train.inference.sampling import SamplingParams
    from dsv4train.posttrain.evaluation import load_for_eval

    try:
        params = SamplingParams(
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        device = checked_model_and_device(args.model, args.device)
        tokenizer, model, _ = load_for_eval(args.model, args.tokenizer, device)
        ids = prompt_ids(tokenizer, args.prompt, args.chat, args.mode)
        eos = tokenizer.token_to_id(chat.EOS)
        params = dataclasses.replace(params, stop_token_ids=(eos,) if eos is not None else ())
        engine = Engine(model, max_batch=1, tokenizer=tokenizer)
        engine.check([ids], [params])
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    stream = TextStream(tokenizer)
    started = time.perf_counter()
    (completion,) = engine.generate([ids], params, on_token=stream)
    stream.finish()
    seconds = time.perf_counter() - started
    n = len(completion.token_ids)
    print(f"\n[{completion.finish_reason}: {n} tokens in {seconds:.2f} s, {n / max(seconds, 1e-9):.1f} tok/s]")
    return 0
