"""Chat special tokens at fixed ids (dsv4train/data/tokenizer.py) and growing a model's vocabulary for new ids
(dsv4train/train/vocabulary.py).

The special strings and their ids are spelled out here again on purpose (the layout the lead fixed for issue 14):
a typo or a reordering in the module's constants must fail these tests. Expected rows (the mean, the hash-routing
picks, the new logits) are computed here with plain torch / by hand, never read back from the code under test.
"""

import re

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv4train.data import chat
from dsv4train.data.chat import Conversation, Message, ToolCall, ToolDefinition, render
from dsv4train.data.tokenizer import (
    CHAT_SPECIAL_TOKENS,
    chat_token_ids,
    ensure_chat_tokens,
    required_vocab_size,
    train_tokenizer,
)
from dsv4train.models.flavors import get_flavor
from dsv4train.models.model import DSV4Model
from dsv4train.models.moe import build_hash_table
from dsv4train.train.vocabulary import grow_hash_table, grow_vocabulary, growth_message

FIXED_IDS = {
    "<｜begin▁of▁sentence｜>": 0,
    "<｜end▁of▁sentence｜>": 1,
    "<｜pad｜>": 2,
    "<｜User｜>": 3,
    "<｜Assistant｜>": 4,
    "<｜latest_reminder｜>": 5,
    "<think>": 6,
    "</think>": 7,
    "｜DSML｜": 8,
}
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
CHAT_STRINGS = [s for s in FIXED_IDS if s != "<｜pad｜>"]  # what the chat format needs; padding uses EOS
SPECIAL_RE = re.compile("|".join(map(re.escape, FIXED_IDS)))
WORDS = "the cat sat on a mat while two dogs ran far away from seven red boxes under blue skies".split()


def short_docs(n: int = 300) -> list[str]:
    """Deterministic short documents: a few words each, some holding special strings as data would."""
    docs = []
    for i in range(n):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 5)]
        text = " ".join(words) + f" {i}."
        docs.append(f"<｜User｜>{text}<think>{words[0]}</think>" if i % 10 == 0 else text)
    return docs


def bare_tokenizer(docs: list[str], specials: list[str], vocab_size: int = 300) -> Tokenizer:
    """A byte-level BPE made with `tokenizers` directly, as a tokenizer from elsewhere (or an old folder) would be."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_tokenizer(short_docs(), 512)


def tool_conversation() -> Conversation:
    """Tools, reasoning in two turns, a tool call and its result, a latest reminder: every special string."""
    weather = ToolDefinition("weather", "Weather for a city", {"type": "object", "properties": {"city": {}}})
    return Conversation(
        (
            Message("system", "You are terse."),
            Message("latest_reminder", "today is Monday"),
            Message("user", "Weather in Zürich?"),
            Message(
                "assistant",
                "Let me check.",
                reasoning="need the tool",
                tool_calls=(ToolCall("weather", {"city": "Zürich", "days": 2}, id="c1"),),
            ),
            Message("tool", "sunny, 21 °C", tool_call_id="c1"),
            Message("assistant", "Sunny, 21 °C.", reasoning="the tool said so"),
        ),
        (weather,),
    )


# ---------------------------------------------------------------------------------------------------------------
# Fixed ids in every tokenizer the project trains
# ---------------------------------------------------------------------------------------------------------------


def test_every_reserved_string_is_one_special_token_at_its_fixed_id(tok):
    assert tok.get_vocab_size() == 512
    for s, want in FIXED_IDS.items():
        assert tok.token_to_id(s) == want, s
        assert tok.encode(s, add_special_tokens=False).ids == [want], s
        assert tok.decode([want], skip_special_tokens=True) == "", f"{s} is not marked special"
    assert chat_token_ids(tok) == {s: FIXED_IDS[s] for s in CHAT_STRINGS}


def test_the_chat_module_and_the_tokenizer_agree_on_the_special_strings():
    assert list(CHAT_SPECIAL_TOKENS) == CHAT_STRINGS
    assert set(chat.SPECIAL_STRINGS) == set(CHAT_STRINGS), "a special string of chat.py is not reserved"


@pytest.mark.parametrize("mode", ["chat", "think", "think_max"])
def test_special_ids_sit_exactly_where_rendered_chat_text_has_the_strings(tok, mode):
    text = render(tool_conversation(), mode=mode)
    found = [(m.start(), m.end(), m.group()) for m in SPECIAL_RE.finditer(text)]
    assert {s for *_, s in found} >= {BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "｜DSML｜"}
    if mode != "chat":
        assert {"<think>", "</think>"} <= {s for *_, s in found}
    enc = tok.encode(text, add_special_tokens=False)
    special = [(a, b, i) for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i < len(FIXED_IDS)]
    assert special == [(a, b, FIXED_IDS[s]) for a, b, s in found]
    # nothing else in the text is a special id, and the ordinary tokens never swallow part of a special string
    ordinary_spans = [(a, b) for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i >= len(FIXED_IDS)]
    assert all(b <= s or a >= e for a, b in ordinary_spans for s, e, _ in found)
    assert tok.decode(enc.ids, skip_special_tokens=False) == text


@pytest.mark.parametrize(
    "text",
    [
        "plain words only",
        "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜></think>answer<｜end▁of▁sentence｜>",
        "  spaced <think> x </think>\n\n<｜DSML｜tool_calls>\n</｜DSML｜tool_calls>",
        "Zürich 21 °C<｜latest_reminder｜>末尾<｜pad｜>",
        "<think></think><think>",  # adjacent special strings
    ],
)
def test_decode_round_trips_with_and_without_the_special_tokens(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids, skip_special_tokens=True) == SPECIAL_RE.sub("", text)


def test_bpe_learns_no_merges_from_the_reserved_strings():
    # the only text between the reserved strings is "abc" and " ": BPE can learn "ab" and "abc" and nothing else
    tok = train_tokenizer(["<｜User｜><｜User｜> <think></think>abc<｜DSML｜>"] * 50, 300)
    learned = {t for t, i in tok.get_vocab().items() if i >= 256 + len(FIXED_IDS)}
    assert learned == {"ab", "abc"}


# ---------------------------------------------------------------------------------------------------------------
# A tokenizer that lacks them
# ---------------------------------------------------------------------------------------------------------------


def test_ensure_chat_tokens_appends_the_missing_ones_with_consecutive_ids_and_is_idempotent():
    tok = bare_tokenizer(short_docs(), [BOS, EOS])
    before_vocab, before_size = tok.get_vocab(), tok.get_vocab_size()
    plain = "the cat sat on a mat 12."
    plain_ids = tok.encode(plain).ids
    with pytest.raises(ValueError, match="<｜User｜>") as err:
        chat_token_ids(tok)
    assert "<｜begin▁of▁sentence｜>" not in str(err.value)  # only the missing ones are named

    added = ensure_chat_tokens(tok)
    want_added = ["<｜User｜>", "<｜Assistant｜>", "<｜latest_reminder｜>", "<think>", "</think>", "｜DSML｜"]
    assert added == want_added
    assert {s: tok.token_to_id(s) for s in added} == {s: before_size + i for i, s in enumerate(want_added)}
    assert required_vocab_size(tok) == before_size + 6
    after_vocab = tok.get_vocab()
    assert {t: after_vocab[t] for t in before_vocab} == before_vocab  # every old id keeps its token
    assert tok.encode(plain).ids == plain_ids
    ids = chat_token_ids(tok)
    assert ids == {BOS: 0, EOS: 1, **{s: before_size + i for i, s in enumerate(want_added)}}
    for s, i in ids.items():
        assert tok.encode(s, add_special_tokens=False).ids == [i]
    text = render(tool_conversation(), mode="think")
    assert tok.decode(tok.encode(text).ids, skip_special_tokens=False) == text

    frozen = tok.to_str()
    assert ensure_chat_tokens(tok) == []
    assert tok.to_str() == frozen


def test_ensure_chat_tokens_leaves_a_project_tokenizer_untouched(tok):
    frozen = tok.to_str()
    assert ensure_chat_tokens(tok) == []
    assert tok.to_str() == frozen


def test_a_chat_string_held_as_an_ordinary_token_is_refused():
    tok = bare_tokenizer(short_docs(), [BOS, EOS])
    tok.add_tokens(["<think>"])  # an added token that is not special: making it special would re-mean its id
    think_id = tok.token_to_id("<think>")
    with pytest.raises(ValueError, match=f"absent .*<｜User｜>.*ordinary tokens.*'<think>': {think_id}") as err:
        chat_token_ids(tok)
    assert "'<think>'" not in str(err.value).split("ordinary")[0]  # named as ordinary, not as absent
    frozen = tok.to_str()
    with pytest.raises(ValueError, match=f"holds {{'<think>': {think_id}}} as ordinary tokens"):
        ensure_chat_tokens(tok)
    assert tok.to_str() == frozen  # refused before adding anything


# ---------------------------------------------------------------------------------------------------------------
# Growing the model
# ---------------------------------------------------------------------------------------------------------------

SEED, N_NEW = 5, 6
VOCAB_TENSORS = ("embed.weight", "head.weight", "layers.0.ffn.gate.tid2eid")


@pytest.fixture(scope="module")
def base():
    cfg = get_flavor("toy")
    assert cfg.n_hash_layers == 1  # VOCAB_TENSORS lists the toy flavor's one hash table
    model = DSV4Model(cfg)
    model.init_weights(seed=SEED)
    return cfg, model


@pytest.fixture(scope="module")
def grown(base):
    cfg, model = base
    sd = model.state_dict()
    originals = {k: v.clone() for k, v in sd.items()}
    new_cfg, new_sd, report = grow_vocabulary(cfg, sd, cfg.vocab_size + N_NEW, seed=SEED)
    return sd, originals, new_cfg, new_sd, report


def test_old_rows_and_every_other_tensor_are_unchanged(base, grown):
    cfg, _ = base
    sd, originals, new_cfg, new_sd, report = grown
    V = cfg.vocab_size
    assert (new_cfg.vocab_size, report.old_vocab_size, report.new_vocab_size) == (V + N_NEW, V, V + N_NEW)
    assert set(report.grown) == set(VOCAB_TENSORS)
    assert new_sd.keys() == sd.keys()
    for name, t in originals.items():
        assert torch.equal(sd[name], t), f"the input {name} was modified"
        if name in VOCAB_TENSORS:
            assert new_sd[name].shape == (V + N_NEW, *t.shape[1:]) and new_sd[name].dtype == t.dtype
            assert torch.equal(new_sd[name][:V], t), f"old rows of {name} changed"
        else:
            assert torch.equal(new_sd[name], t), name
    DSV4Model(new_cfg).load_state_dict(new_sd, strict=True)


def test_new_embedding_and_head_rows_are_the_mean_of_the_old_rows(grown):
    _, originals, _, new_sd, _ = grown
    for name in ("embed.weight", "head.weight"):
        old = originals[name].double()
        mean = (sum(old[i] for i in range(old.shape[0])) / old.shape[0]).float()  # row by row, in float64
        # float64 sums in another order agree to ~1e-16 relative; after rounding to fp32 a value may land one fp32
        # ulp (6e-8 relative) away, so allow 2 ulps
        torch.testing.assert_close(new_sd[name][-N_NEW:], mean.expand(N_NEW, -1), rtol=1.2e-7, atol=0)
        assert mean.abs().max() > 0  # the toy init gives a nonzero mean, so a zero init would fail the check above


def test_new_hash_rows_pick_valid_balanced_experts_and_continue_build_hash_table(base, grown):
    cfg, _ = base
    _, originals, _, new_sd, _ = grown
    table = new_sd["layers.0.ffn.gate.tid2eid"]
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    new_rows = table[-N_NEW:]
    assert all(len(set(row.tolist())) == k for row in new_rows)
    assert int(new_rows.min()) >= 0 and int(new_rows.max()) < E
    load = torch.bincount(table.reshape(-1), minlength=E)
    assert int(load.max() - load.min()) <= 1  # a balanced table stays balanced by count
    # the toy table was built without token counts, so growing it must equal building the larger table at once
    assert torch.equal(table, build_hash_table(cfg.vocab_size + N_NEW, E, k, SEED))


def test_new_hash_rows_go_to_the_least_loaded_experts():
    # 4 experts, k = 2; three old rows all on experts 0 and 1 -> loads [3, 3, 0, 0]. Each new id takes the two
    # least loaded: {2, 3} -> [3, 3, 1, 1], {2, 3} -> [3, 3, 2, 2], {2, 3} -> [3, 3, 3, 3]. Experts 2 and 3 are
    # strictly less loaded each time, so the tie-break plays no part.
    old = torch.tensor([[0, 1], [0, 1], [0, 1]])
    grown = grow_hash_table(old, n_experts=4, n_new=3, seed=0)
    assert torch.equal(grown[:3], old)
    assert grown[3:].tolist() == [[2, 3], [2, 3], [2, 3]]


def test_the_grown_model_gives_the_same_logits_for_old_tokens(base, grown):
    cfg, model = base
    *_, new_cfg, new_sd, _ = grown
    big = DSV4Model(new_cfg)
    big.load_state_dict(new_sd, strict=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        old_logits, new_logits = model(ids), big(ids)
    V = cfg.vocab_size
    assert new_logits.shape == (2, 32, V + N_NEW)
    # same weights and inputs; only the head GEMM is wider, which may change its blocking, so allow fp32 rounding
    torch.testing.assert_close(new_logits[..., :V], old_logits, rtol=1e-5, atol=1e-6)
    # a head row equal to the mean of the rows gives the mean of the logits (linearity), so p_new <= 1/V
    mean_logit = old_logits.double().mean(-1, keepdim=True).float().expand(-1, -1, N_NEW)
    torch.testing.assert_close(new_logits[..., V:], mean_logit, rtol=1e-4, atol=1e-6)
    assert float(new_logits.softmax(-1)[..., V:].max()) <= 1 / V
    with torch.no_grad():  # the new ids themselves embed and route
        assert torch.isfinite(big(torch.arange(V, V + N_NEW).view(1, -1))).all()


def test_shrinking_is_refused_and_the_same_size_changes_nothing(base):
    cfg, model = base
    sd = model.state_dict()
    with pytest.raises(ValueError, match=f"cannot shrink the vocabulary from {cfg.vocab_size} to 100"):
        grow_vocabulary(cfg, sd, 100)
    same_cfg, same_sd, report = grow_vocabulary(cfg, sd, cfg.vocab_size)
    assert same_cfg == cfg and report.grown == () and all(same_sd[k] is sd[k] for k in sd)


def test_a_state_dict_that_does_not_match_the_config_is_named(base):
    cfg, model = base
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="missing.*embed.weight.*unexpected.*model.embed.weight"):
        grow_vocabulary(cfg, sd, cfg.vocab_size + 1)
    with pytest.raises(ValueError, match="vocab_size 5000.*wrong shapes.*embed.weight"):
        grow_vocabulary(get_flavor("toy", vocab_size=5000), model.state_dict(), 5001)


def test_a_tokenizer_without_chat_tokens_and_its_model_grow_together():
    """The SFT path: an old tokenizer whose ids fill the model, its missing chat tokens added, the model grown to
    match, a rendered conversation run through it, and the one-line message the CLI prints."""
    tok = bare_tokenizer(short_docs(), [BOS, EOS, "<｜pad｜>"])
    cfg = get_flavor("toy", vocab_size=tok.get_vocab_size())
    model = DSV4Model(cfg)
    model.init_weights(seed=1)
    added = ensure_chat_tokens(tok)
    new_cfg, new_sd, report = grow_vocabulary(cfg, model.state_dict(), required_vocab_size(tok), seed=1)
    assert new_cfg.vocab_size == cfg.vocab_size + 6
    big = DSV4Model(new_cfg)
    big.load_state_dict(new_sd, strict=True)
    ids = torch.tensor([tok.encode(render(tool_conversation(), mode="think")).ids[: new_cfg.max_seq_len]])
    assert int(ids.max()) >= cfg.vocab_size  # the conversation uses the new ids
    with torch.no_grad():
        assert torch.isfinite(big(ids)).all()
    msg = growth_message(added, report, first_new_id=cfg.vocab_size)
    V = cfg.vocab_size
    assert f"added at ids {V}..{V + 5}: <｜User｜>, <｜Assistant｜>" in msg
    assert f"model vocabulary {V} -> {V + 6}" in msg and "mean of the old rows" in msg
    assert "\n" not in msg
    assert growth_message([], grow_vocabulary(cfg, model.state_dict(), V)[2]) == (
        f"tokenizer has every chat special token; model vocabulary stays {V}"
    )
