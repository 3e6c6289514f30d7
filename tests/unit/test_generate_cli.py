"""`dsv4 generate MODEL --prompt TEXT`: streams the completion of the generation engine, in raw and chat format,
and refuses bad arguments with exit 2 and a message that names them."""

from __future__ import annotations

import io

import pytest

from dsv4train.cli.generate import TextStream, generate_main
from dsv4train.data import chat
from dsv4train.data.tokenizer import train_tokenizer
from dsv4train.inference.full_forward import generate_full_forward
from dsv4train.models.model import DSV4Model
from dsv4train.models.pretrained import save_dsv4
from dsv4train.testing.toy_configs import tiny_config

BOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"  # arch ref §9.4, written out


@pytest.fixture(scope="module")
def tok():
    docs = [f"def f{i}(x):\n    return x + {i}\n# café {i}" for i in range(200)]
    return train_tokenizer(docs, 400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    model = DSV4Model(tiny_config(vocab_size=tok.get_vocab_size(), max_seq_len=64, init_std=0.1))
    model.init_weights(0)
    folder = save_dsv4(model, tmp_path_factory.mktemp("gen") / "model")
    tok.save(str(folder / "tokenizer.json"))
    return folder, model.eval()


def _expected_text(tok, model, prompt_text: str, n: int) -> str:
    ids = tok.encode(prompt_text, add_special_tokens=False).ids
    eos = tok.token_to_id(chat.EOS)
    out = generate_full_forward(model, [ids], n, eos, progress=False)[0]  # the engine's reference, greedy
    return tok.decode(out, skip_special_tokens=False)


@pytest.mark.parametrize("chat_format, mode", [(False, "chat"), (True, "chat"), (True, "think")])
def test_streams_the_greedy_completion(saved, tok, capsys, chat_format, mode):
    folder, model = saved
    argv = [str(folder), "--prompt", "def f3(x):", "--max-new-tokens", "12", "--device", "cpu", "--mode", mode]
    assert generate_main(argv + (["--chat"] if chat_format else [])) == 0
    out = capsys.readouterr().out
    opening = ASSISTANT + ("</think>" if mode == "chat" else "<think>")
    prompt_text = BOS + USER + "def f3(x):" + opening if chat_format else BOS + "def f3(x):"
    text, summary = out.rsplit("\n[", 1)
    assert text == _expected_text(tok, model, prompt_text, 12)
    assert summary.startswith(("length: 12 tokens", "stop: ")) and "tok/s]" in summary


def test_the_stream_waits_for_whole_characters(tok):
    """Byte-level BPE may split a character over tokens: nothing is printed until it is whole."""
    ids = tok.encode("a✓", add_special_tokens=False).ids  # ✓ never occurs in the corpus: three byte tokens
    assert len(ids) >= 3
    out = io.StringIO()
    stream = TextStream(tok, out)
    for token in ids:
        stream(0, token)
    assert out.getvalue() == "a✓" and "\ufffd" not in out.getvalue()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--prompt", "x" * 400], "tokens"),
    ],
)
def test_bad_arguments_exit_2_naming_them(saved, capsys, extra, message):
    folder, _ = saved
    assert generate_main([str(folder), "--prompt", "hi", "--device", "cpu", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_model_exits_2(tmp_path, capsys):
    assert generate_main([str(tmp_path / "nope"), "--prompt", "hi"]) == 2
    assert "no such file" in capsys.readouterr().err
