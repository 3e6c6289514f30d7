"""The HF export's Jinja chat template (dsv4train/data/chat_template.jinja) through transformers'
`apply_chat_template` agrees with our renderer `chat.render` character for character, and its token ids with our
tokenizer's encoding of that text; the tokenizer folder loads offline with AutoTokenizer; `dsv4 convert to-hf` writes
it (from `--tokenizer`, or from a training run's data folder) or says the export is weights-only.

The expected text comes from `chat.render`, which tests/unit/test_chat.py checks against strings written by hand
from DeepSeek's encoder; here the template is a second, independent implementation of the same rules. The
conversations are test_chat.py's set (every rule) plus cases aimed at the template: JSON values whose serialisation
differs between json.dumps options (non-ASCII, `<`, `&`, quotes, key order, nested objects), tools on the system
message, results without ids, a generation prompt after tool results, and reminders after a user turn.
"""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4train.data.chat import (
    BOS,
    EOS,
    SPECIAL_STRINGS,
    USER,
    Conversation,
    Message,
    ToolCall,
    ToolDefinition,
    render,
)
from dsv4train.data.hf_tokenizer import template_inputs, write_hf_tokenizer
from dsv4train.data.tokenizer import missing_chat_tokens
from tests.unit.test_chat import CASES as CHAT_CASES, WEATHER, asst, conv, sys_, tool, user

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")

from dsv4train.cli.main import main as dsv4  # noqa: E402
from dsv4train.config.errors import ConfigError  # noqa: E402
from dsv4train.models.model import DSV4Model  # noqa: E402
from dsv4train.models.pretrained import save_dsv4  # noqa: E402
from dsv4train.testing.toy_configs import tiny_config  # noqa: E402
from dsv4train.train import checkpoint  # noqa: E402

PAD = "<｜pad｜>"
# The lead's fixed layout (ids 0..8); the test builds its own tokenizer so it does not depend on train_tokenizer.
RESERVED = (BOS, EOS, PAD, *[s for s in SPECIAL_STRINGS if s not in (BOS, EOS)])

# Values whose JSON differs between serialisers: Jinja's own tojson escapes <>&' as \u003c…, sorts keys and writes
# no spaces; ensure_ascii=True writes \u00e9 for é. The renderer's json.dumps(ensure_ascii=False) keeps them all.
TRICKY_ARGS = {
    "zeta_first": {"b": 1, "a": [1, {"y": None, "x": "é"}]},  # key order as given, not sorted
    "quotes": 'say "hi" & <b>it\'s</b>',  # a string: raw, string="true"
    "html": ["<script>", "a & b", "it's"],  # inside JSON: no \u003c escapes
    "unicode": {"日本": "naïve café 😀", "sep": "line\u2028sep"},
    "numbers": [1e-7, 12345678901234567890, -0.0, 2.5, 3],
    "flags": [True, False, None],
    "empties": [{}, [], ""],
    "multiline": "first\nsecond\n",
    "digits_as_text": "42",
    "nothing": None,
}
SEARCH = ToolDefinition(
    "search",
    'Find "things" <b> & cafés',
    {"type": "object", "properties": {"q": {"type": "string", "description": "ünïcode <q>"}}, "required": ["q"]},
)
CALLS = (
    ToolCall("search", TRICKY_ARGS, id="c1"),
    ToolCall("weather", {"city": "Zürich"}, id="c2"),
    ToolCall("ping", {}, id="c3"),
)
CASES = {
    **CHAT_CASES,
    "tricky_json_with_tools": conv(
        sys_("S"),
        user("Look things up."),
        asst("On it.", "plan: three calls", CALLS),
        tool("pong", "c3"),
        tool("8°C", "c2"),
        tool('found "x" <here> & there', "c1"),
        user("Summarise."),
        asst("Done: 8°C.", "merge the results"),
        tools=[SEARCH, WEATHER, ToolDefinition("ping")],
    ),
    "tricky_json_without_tools": conv(user("q"), asst("calling", "r", [ToolCall("search", TRICKY_ARGS)])),
    "results_without_ids_then_generation": conv(
        user("q"), asst(calls=[ToolCall("ping"), ToolCall("ping", {"n": 2})]), tool("first"), tool("second")
    ),
    "tools_without_system_several_turns": conv(
        user("q1"),
        asst("a1", "r1", [ToolCall("weather", {"city": "Oslo"}, id="w")]),
        tool("cold", "w"),
        asst("It is cold.", "r2"),
        user("q2"),
        tools=[WEATHER],
    ),
    "reminder_after_user_and_before_user": conv(
        sys_("S"),
        user("q1"),
        Message("latest_reminder", "be brief"),
        asst("a1", "r1"),
        Message("latest_reminder", "2026-02-21"),
        user("q2"),
        user("and q3"),
    ),
    "ends_on_reminder": conv(user("q"), Message("latest_reminder", "today")),
    "user_joins_tool_results": conv(
        user("q"), asst("", "need it", [ToolCall("ping", id="p")]), tool("pong", "p"), user("thanks"), asst("ok")
    ),
}
MODE_KWARGS = {"chat": {}, "think": {"thinking": True}, "think_max": {"thinking": True, "reasoning_effort": "max"}}


def _train_tokenizer(reserved=RESERVED, vocab_size=300) -> Tokenizer:
    """A byte-level BPE like dsv4train's, with `reserved` as special tokens at ids 0.. (300: the tiny model's
    vocabulary, so the convert test can export it with a model)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(reserved),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [render(c, "think") for c in CASES.values()] * 3
    for s in SPECIAL_STRINGS:  # merges only between the special strings, as the project's trainer does
        corpus = [piece for doc in corpus for piece in doc.split(s) if piece]
    tok.train_from_iterator(corpus, trainer=trainer)
    assert [tok.token_to_id(s) for s in reserved] == list(range(len(reserved)))
    return tok


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return _train_tokenizer()


@pytest.fixture(scope="module")
def hf_folder(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    write_hf_tokenizer(tok, folder, model_max_length=512)
    return folder


@pytest.fixture(scope="module")
def hf_tok(hf_folder):
    return transformers.AutoTokenizer.from_pretrained(hf_folder)


def _apply(hf_tok, c: Conversation, mode: str, add_generation_prompt: bool, **extra):
    inputs = template_inputs(c)
    return hf_tok.apply_chat_template(
        inputs["messages"],
        tools=inputs["tools"],
        add_generation_prompt=add_generation_prompt,
        **MODE_KWARGS[mode],
        **extra,
    )


# ---------------------------------------------------------------------------------------------------------------
# Template text == chat.render, token ids == our encoding
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("mode", list(MODE_KWARGS))
@pytest.mark.parametrize("name", list(CASES))
def test_template_text_equals_render(hf_tok, name, mode, add_generation_prompt):
    c = CASES[name]
    text = _apply(hf_tok, c, mode, add_generation_prompt, tokenize=False)
    assert text == render(c, mode, add_generation_prompt)


@pytest.mark.parametrize("mode", list(MODE_KWARGS))
@pytest.mark.parametrize("name", ["tricky_json_with_tools", "multi_turn", "ends_on_user", "reminder"])
def test_template_token_ids_equal_our_encoding(hf_tok, tok, name, mode):
    c = CASES[name]
    ids = _apply(hf_tok, c, mode, True, tokenize=True, return_dict=False)
    text = render(c, mode)
    assert ids == tok.encode(text, add_special_tokens=False).ids
    assert ids[0] == 0 and ids.count(tok.token_to_id(USER)) == text.count(USER)  # BOS once, specials whole


def test_tricky_values_are_written_as_json_dumps_writes_them(hf_tok):
    """The JSON of the tricky values, spelled out: no \\u escapes, keys in the given order, Python's separators."""
    text = _apply(hf_tok, CASES["tricky_json_without_tools"], "chat", False, tokenize=False)
    assert '<｜DSML｜parameter name="zeta_first" string="false">{"b": 1, "a": [1, {"y": null, "x": "é"}]}<' in text
    assert '<｜DSML｜parameter name="quotes" string="true">say "hi" & <b>it\'s</b><' in text
    assert '<｜DSML｜parameter name="html" string="false">["<script>", "a & b", "it\'s"]<' in text
    assert '<｜DSML｜parameter name="unicode" string="false">{"日本": "naïve café 😀", "sep": "line\u2028sep"}<' in text
    assert '<｜DSML｜parameter name="numbers" string="false">[1e-07, 12345678901234567890, -0.0, 2.5, 3]<' in text
    assert '<｜DSML｜parameter name="nothing" string="false">null<' in text


def test_keyword_aliases(hf_tok):
    """enable_thinking reads like thinking; reasoning_effort "high" (or None) adds nothing, as in the encoder; "max"
    without thinking adds nothing either; a message's `reasoning` reads like `reasoning_content`."""
    c = CASES["tools_interleaved"]
    inputs = template_inputs(c)

    def apply(messages=inputs["messages"], **kw):
        return hf_tok.apply_chat_template(messages, tools=inputs["tools"], tokenize=False, **kw)

    assert apply(enable_thinking=True) == render(c, "think", False)
    assert apply(thinking=True, reasoning_effort="high") == render(c, "think", False)
    assert apply(thinking=True, reasoning_effort=None) == render(c, "think", False)
    assert apply(enable_thinking=True, reasoning_effort="max") == render(c, "think_max", False)
    assert apply(reasoning_effort="max") == render(c, "chat", False)
    renamed = [{("reasoning" if k == "reasoning_content" else k): v for k, v in m.items()} for m in inputs["messages"]]
    assert apply(renamed, thinking=True) == render(c, "think", False)


def test_tools_on_the_system_message_as_the_encoder_takes_them(hf_tok):
    c = CASES["tools_interleaved"]
    inputs = template_inputs(c)
    messages = [{**inputs["messages"][0], "tools": inputs["tools"]}, *inputs["messages"][1:]]
    for mode, kwargs in MODE_KWARGS.items():
        assert hf_tok.apply_chat_template(messages, tokenize=False, **kwargs) == render(c, mode, False)
    with pytest.raises(jinja2.TemplateError, match="tools are given both"):
        hf_tok.apply_chat_template(messages, tools=inputs["tools"], tokenize=False)


def test_openai_record_with_null_content_renders_like_the_conversation(hf_tok):
    record = {
        "messages": [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "reasoning": "r",
                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "ping", "arguments": {"n": 1}}}],
            },
            {"role": "tool", "tool_call_id": "x", "content": "pong"},
        ]
    }
    c = Conversation.from_dict(record)
    for mode, kwargs in MODE_KWARGS.items():
        text = hf_tok.apply_chat_template(record["messages"], tokenize=False, add_generation_prompt=True, **kwargs)
        assert text == render(c, mode)


BAD = {
    "arguments as a JSON string": (
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"n": 1}'}}]},
        ],
        {},
        "arguments must be a mapping",
    ),
    "developer role": ([{"role": "developer", "content": "x"}], {}, "unknown role developer"),
    "content blocks": ([{"role": "user", "content": [{"type": "text", "text": "q"}]}], {}, "must be a string"),
    "special string in content": ([{"role": "user", "content": "a<｜User｜>b"}], {}, "special string <｜User｜>"),
    "bad effort": ([{"role": "user", "content": "q"}], {"thinking": True, "reasoning_effort": "low"}, "expected"),
    "system later": ([{"role": "user", "content": "q"}, {"role": "system", "content": "S"}], {}, "only be first"),
    "assistant first": ([{"role": "assistant", "content": "a"}], {}, "must follow a user turn"),
    "tool without call": (
        [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"}],
        {},
        "tool result without a preceding",
    ),
    "unknown tool_call_id": (
        [
            {"role": "user", "content": "q"},
            {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": {}}}]},
            {"role": "tool", "tool_call_id": "zz", "content": "r"},
        ],
        {},
        "names no call",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_what_the_renderer_refuses_the_template_refuses(hf_tok, case):
    messages, kwargs, pattern = BAD[case]
    with pytest.raises(jinja2.TemplateError, match=pattern):
        hf_tok.apply_chat_template(messages, tokenize=False, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer folder
# ---------------------------------------------------------------------------------------------------------------


def test_folder_loads_with_v4_special_tokens(hf_tok, hf_folder, tok):
    config = json.loads((hf_folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    # transformers 5 never cleans up BPE output; 4.x did unless told not to (it would eat the space in "x ,")
    assert config["clean_up_tokenization_spaces"] is False
    assert (hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == (BOS, EOS, EOS)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (0, 1, 1)
    assert hf_tok.model_max_length == 512
    text = "def f(x):\n    return  x  # café"  # double spaces survive: no clean-up of tokenization spaces
    assert hf_tok(text)["input_ids"] == tok.encode(text).ids  # no BOS or EOS added to plain text
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text


def test_tokenizer_without_chat_tokens_gets_no_template(tmp_path):
    bare = _train_tokenizer(reserved=(BOS, EOS, PAD))
    assert missing_chat_tokens(bare) == [s for s in SPECIAL_STRINGS if s not in (BOS, EOS)]
    with pytest.raises(ConfigError, match="does not keep"):
        write_hf_tokenizer(bare, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    write_hf_tokenizer(bare, tmp_path / "plain", with_chat_template=False)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "plain")
    assert loaded.chat_template is None and loaded.eos_token == EOS


# ---------------------------------------------------------------------------------------------------------------
# `dsv4 convert to-hf`
# ---------------------------------------------------------------------------------------------------------------


def _tiny_model() -> DSV4Model:
    model = DSV4Model(tiny_config(["swa"], n_mtp_layers=0, n_hash_layers=0))
    model.init_weights(0)
    return model.eval()


def _check_export_chats(dst, tok):
    hf = transformers.AutoTokenizer.from_pretrained(dst)
    c = CASES["tools_interleaved"]
    for mode in MODE_KWARGS:
        assert _apply(hf, c, mode, True, tokenize=False) == render(c, mode)
    assert json.loads((dst / "tokenizer.json").read_text(encoding="utf-8")) == json.loads(tok.to_str())
    transformers.DeepseekV4ForCausalLM.from_pretrained(dst)  # the weights are still there and load


def test_convert_to_hf_with_tokenizer(tmp_path, tok, capsys):
    save_dsv4(_tiny_model(), tmp_path / "ds")
    prepared = tmp_path / "prepared"  # a `dsv4 data prepare` folder holds tokenizer.json
    prepared.mkdir()
    tok.save(str(prepared / "tokenizer.json"))
    assert dsv4(["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "hf"), "--tokenizer", str(prepared)]) == 0
    assert "with the V4 chat template" in capsys.readouterr().out
    _check_export_chats(tmp_path / "hf", tok)
    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == _tiny_model().cfg.max_seq_len
    # the tokenizer.json file itself works too
    file_arg = str(prepared / "tokenizer.json")
    assert dsv4(["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "hf2"), "--tokenizer", file_arg]) == 0
    assert (tmp_path / "hf2" / "tokenizer_config.json").exists()


def test_convert_to_hf_without_tokenizer_is_weights_only(tmp_path, capsys):
    save_dsv4(_tiny_model(), tmp_path / "ds")
    assert dsv4(["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "hf")]) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "weights only" in line]
    assert len(notes) == 1 and "--tokenizer" in notes[0]
    assert not (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "hf" / "config.json").exists()


def test_convert_with_a_tokenizer_without_chat_tokens_writes_no_template(tmp_path, capsys):
    save_dsv4(_tiny_model(), tmp_path / "ds")
    _train_tokenizer(reserved=(BOS, EOS, PAD)).save(str(tmp_path / "old.json"))
    args = ["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "old.json")]
    assert dsv4(args) == 0
    assert "lacks the chat tokens" in capsys.readouterr().out
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert loaded.chat_template is None and loaded.eos_token_id == 1


def test_convert_refuses_a_tokenizer_that_does_not_fit_the_model(tmp_path, capsys):
    save_dsv4(_tiny_model(), tmp_path / "ds")
    big = _train_tokenizer(vocab_size=400)
    big.save(str(tmp_path / "big.json"))
    args = ["convert", "to-hf", str(tmp_path / "ds"), str(tmp_path / "hf"), "--tokenizer", str(tmp_path / "big.json")]
    assert dsv4(args) == 2
    assert "300 embedding rows" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()  # refused before anything is written
    swapped = _train_tokenizer(reserved=(EOS, BOS, *RESERVED[2:]))
    swapped.save(str(tmp_path / "swapped.json"))
    assert dsv4([*args[:-1], str(tmp_path / "swapped.json")]) == 2
    assert "has id 1, but the exported config.json names 0 as bos_token_id" in capsys.readouterr().err
    assert dsv4([*args[:-1], str(tmp_path / "nowhere")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err
    assert dsv4(["convert", "from-hf", str(tmp_path / "ds"), str(tmp_path / "x"), "--tokenizer", "t.json"]) == 2
    assert "to-hf` only" in capsys.readouterr().err


def _run_dir(root, data_dir) -> None:
    """A training run directory as the trainer leaves it: config.resolved.yaml and one DCP checkpoint."""
    model = _tiny_model()
    checkpoint.save(root / "checkpoints", 3, model, torch.optim.SGD(model.parameters(), lr=0.1), {"step": 3}, keep=1)
    (root / "config.resolved.yaml").write_text(f"seed: 0\ndata:\n  dir: {data_dir}\n  sources: []\n")


def test_convert_run_dir_defaults_to_the_tokenizer_of_its_data_dir(tmp_path, tok, capsys, monkeypatch):
    prepared = tmp_path / "data" / "prepared"
    prepared.mkdir(parents=True)
    tok.save(str(prepared / "tokenizer.json"))
    _run_dir(tmp_path / "run", "data/prepared")  # relative, as a user writes it: read from the current directory
    monkeypatch.chdir(tmp_path)
    assert dsv4(["convert", "to-hf", "run", "hf"]) == 0
    assert "data/prepared/tokenizer.json, with the V4 chat template" in capsys.readouterr().out
    _check_export_chats(tmp_path / "hf", tok)
    assert dsv4(["convert", "to-hf", "run/checkpoints/step_3", "hf_step"]) == 0  # one checkpoint of the run
    assert (tmp_path / "hf_step" / "tokenizer.json").exists()
    _run_dir(tmp_path / "run_elsewhere", tmp_path / "gone")
    assert dsv4(["convert", "to-hf", "run_elsewhere", "hf_gone"]) == 0
    out = capsys.readouterr().out
    assert "has no tokenizer.json" in out and "weights only" in out
    assert not (tmp_path / "hf_gone" / "tokenizer.json").exists()
