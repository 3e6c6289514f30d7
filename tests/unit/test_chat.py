"""DeepSeek-V4 chat format (dsv4train/data/chat.py): rendered text, assistant spans, parsing, records, bad input.

Every expected string below is written by hand from `reference/dsv4-architecture.md` §9.4 and DeepSeek's
`encoding_dsv4.py`, never recorded from the renderer. The special strings are spelled out here
again on purpose: a typo in the module's constants must fail these tests.
"""

import json
import math

import pytest

from dsv4train.data.chat import (
    ChatFormatError,
    ChatParseError,
    Conversation,
    Message,
    ToolCall,
    ToolDefinition,
    parse,
    render,
    render_with_spans,
    visible_message,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
U = "<｜User｜>"
A = "<｜Assistant｜>"
REMINDER = "<｜latest_reminder｜>"
TC_OPEN, TC_CLOSE = "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>"
INV_CLOSE = "</｜DSML｜invoke>"
P_CLOSE = "</｜DSML｜parameter>"

THINK_MAX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)
PREAMBLE_HEAD = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

"""  # noqa: E501  (the encoder's preamble has these long lines verbatim)
PREAMBLE_TAIL = "\n\nYou MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
WEATHER = ToolDefinition(
    "weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}}
)
WEATHER_JSON = (
    '{"name": "weather", "description": "Weather for a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}'
)


def sys_(text):
    return Message("system", text)


def user(text):
    return Message("user", text)


def asst(content="", reasoning=None, calls=()):
    return Message("assistant", content, reasoning=reasoning, tool_calls=calls)


def tool(content, call_id=None):
    return Message("tool", content, tool_call_id=call_id)


def conv(*messages, tools=()):
    return Conversation(messages, tools)


# ---------------------------------------------------------------------------------------------------------------
# Rendering, one rule per test
# ---------------------------------------------------------------------------------------------------------------


def test_plain_chat():
    c = conv(sys_("Be brief."), user("Hi"), asst("Hello!", reasoning="greet"))
    assert render(c, "chat") == BOS + "Be brief." + U + "Hi" + A + "</think>Hello!" + EOS


def test_chat_generation_prompt_and_its_absence():
    c = conv(sys_("S"), user("Hi"))
    assert render(c, "chat") == BOS + "S" + U + "Hi" + A + "</think>"
    assert render(c, "chat", add_generation_prompt=False) == BOS + "S" + U + "Hi"


def test_think_mode_opens_the_last_turn_with_think():
    assert render(conv(user("2+2?")), "think") == BOS + U + "2+2?" + A + "<think>"
    c = conv(user("2+2?"), asst("4", reasoning="add"))
    assert render(c, "think") == BOS + U + "2+2?" + A + "<think>add</think>4" + EOS


def test_think_mode_turn_without_reasoning_still_closes_the_block():
    assert render(conv(user("q"), asst("a")), "think") == BOS + U + "q" + A + "<think></think>a" + EOS


def test_think_mode_drops_earlier_reasoning_without_tools():
    c = conv(sys_("S"), user("q1"), asst("a1", reasoning="r1"), user("q2"), asst("a2", reasoning="r2"))
    expected = BOS + "S" + U + "q1" + A + "</think>a1" + EOS + U + "q2" + A + "<think>r2</think>a2" + EOS
    assert render(c, "think") == expected
    # as a prompt for a third turn, the second reasoning is dropped too
    c3 = conv(*c.messages, user("q3"))
    assert render(c3, "think") == (
        BOS + "S" + U + "q1" + A + "</think>a1" + EOS + U + "q2" + A + "</think>a2" + EOS + U + "q3" + A + "<think>"
    )


def test_think_mode_keeps_every_reasoning_when_tools_are_defined():
    c = conv(sys_("S"), user("q1"), asst("a1", reasoning="r1"), user("q2"), asst("a2", reasoning="r2"), tools=[WEATHER])
    system = "S\n\n" + PREAMBLE_HEAD + WEATHER_JSON + PREAMBLE_TAIL
    expected = BOS + system + U + "q1" + A + "<think>r1</think>a1" + EOS + U + "q2" + A + "<think>r2</think>a2" + EOS
    assert render(c, "think") == expected


def test_chat_mode_never_renders_reasoning_even_with_tools():
    c = conv(sys_("S"), user("q1"), asst("a1", reasoning="r1"), tools=[WEATHER])
    system = "S\n\n" + PREAMBLE_HEAD + WEATHER_JSON + PREAMBLE_TAIL
    assert render(c, "chat") == BOS + system + U + "q1" + A + "</think>a1" + EOS


def test_tools_preamble_lists_one_schema_per_line_and_needs_no_system_message():
    bare = ToolDefinition("ping")
    c = conv(user("q"), tools=[WEATHER, bare])
    schemas = WEATHER_JSON + "\n" + '{"name": "ping"}'
    assert render(c, "chat") == BOS + "\n\n" + PREAMBLE_HEAD + schemas + PREAMBLE_TAIL + U + "q" + A + "</think>"


def test_think_max_instruction_comes_right_after_bos_before_the_system_text():
    c = conv(sys_("S"), user("q"))
    assert render(c, "think_max") == BOS + THINK_MAX + "S" + U + "q" + A + "<think>"
    assert render(conv(user("q")), "think_max") == BOS + THINK_MAX + U + "q" + A + "<think>"
    assert THINK_MAX not in render(c, "think") and THINK_MAX not in render(c, "chat")


def test_tool_call_with_string_and_non_string_parameters():
    args = {"city": "Zürich", "days": 3, "metric": True, "hours": [6, 18], "opts": {"lang": "dé"}, "t": 1.5}
    c = conv(user("q"), asst("Let me check.", calls=[ToolCall("weather", args), ToolCall("ping")]))
    block = (
        TC_OPEN + "\n"
        '<｜DSML｜invoke name="weather">\n'
        '<｜DSML｜parameter name="city" string="true">Zürich</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="days" string="false">3</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="metric" string="false">true</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="hours" string="false">[6, 18]</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="opts" string="false">{"lang": "dé"}</｜DSML｜parameter>\n'
        '<｜DSML｜parameter name="t" string="false">1.5</｜DSML｜parameter>\n'
        "</｜DSML｜invoke>\n"
        '<｜DSML｜invoke name="ping">\n'
        "\n"
        "</｜DSML｜invoke>\n" + TC_CLOSE
    )
    assert render(c, "chat") == BOS + U + "q" + A + "</think>Let me check.\n\n" + block + EOS


def test_tool_results_merge_into_one_user_turn_in_call_order():
    calls = [ToolCall("weather", {"city": "A"}, id="c1"), ToolCall("weather", {"city": "B"}, id="c2")]
    c = conv(user("q"), asst(calls=calls), tool("sunny B", "c2"), tool("rain A", "c1"), user("and?"), asst("done"))
    results = "<tool_result>rain A</tool_result>\n\n<tool_result>sunny B</tool_result>\n\nand?"
    text = render(c, "chat")
    assert text.endswith(EOS + U + results + A + "</think>done" + EOS)
    assert text.count(U) == 2
    # without ids the results are taken to be in call order already
    unordered = conv(user("q"), asst(calls=[ToolCall("ping"), ToolCall("ping")]), tool("first"), tool("second"))
    assert render(unordered, "chat").endswith(
        EOS + U + "<tool_result>first</tool_result>\n\n<tool_result>second</tool_result>" + A + "</think>"
    )


def test_tool_result_turn_counts_as_the_last_user_turn_in_think_mode():
    c = conv(user("q"), asst("", reasoning="need data", calls=[ToolCall("ping")]), tool("pong"), asst("ok", "r2"))
    # no tools defined: the reasoning before the result turn is dropped, the result turn opens with <think>
    expected_tail = U + "<tool_result>pong</tool_result>" + A + "<think>r2</think>ok" + EOS
    assert render(c, "think") == (
        BOS + U + "q" + A + "</think>\n\n" + TC_OPEN + '\n<｜DSML｜invoke name="ping">\n\n' + INV_CLOSE + "\n"
        "" + TC_CLOSE + EOS + expected_tail
    )


def test_latest_reminder_before_the_user_turn():
    c = conv(sys_("S"), Message("latest_reminder", "2026-02-21, Paris"), user("q"), asst("a"))
    assert render(c, "chat") == BOS + "S" + REMINDER + "2026-02-21, Paris" + U + "q" + A + "</think>a" + EOS


def test_latest_reminder_after_a_user_turn_follows_the_opening_as_the_encoder_does():
    c = conv(user("q"), Message("latest_reminder", "be brief"))
    assert render(c, "think") == BOS + U + "q" + A + "<think>" + REMINDER + "be brief"


def test_consecutive_user_messages_join_one_turn():
    assert render(conv(user("a"), user("b")), "chat") == BOS + U + "a\n\nb" + A + "</think>"


def test_multi_turn_chat():
    c = conv(sys_("S"), user("1"), asst("one"), user("2"), asst("two"), user("3"), asst("three"))
    expected = (
        BOS + "S" + "".join(U + q + A + "</think>" + a + EOS for q, a in [("1", "one"), ("2", "two"), ("3", "three")])
    )
    assert render(c, "chat") == expected


def test_spans_cover_exactly_what_the_model_generates():
    c = conv(user("q1"), asst("a1", "r1"), user("q2"), asst("a2", "r2"))
    rendered = render_with_spans(c, "think")
    assert [(s.message_index, rendered.text[s.start : s.end]) for s in rendered.assistant_spans] == [
        (1, "a1" + EOS),
        (3, "r2</think>a2" + EOS),
    ]
    chat = render_with_spans(c, "chat")
    assert [chat.text[s.start : s.end] for s in chat.assistant_spans] == ["a1" + EOS, "a2" + EOS]
    tools = render_with_spans(conv(*c.messages, tools=[WEATHER]), "think_max")
    assert [tools.text[s.start : s.end] for s in tools.assistant_spans] == ["r1</think>a1" + EOS, "r2</think>a2" + EOS]


# ---------------------------------------------------------------------------------------------------------------
# Round trips over a set of conversations that covers every rule
# ---------------------------------------------------------------------------------------------------------------

CALLS = (ToolCall("weather", {"city": "Zürich", "days": 2}, id="a"), ToolCall("ping", {}, id="b"))
CASES = {
    "plain": conv(sys_("S"), user("Hi"), asst("Hello", "greet")),
    "multi_turn": conv(sys_("S"), user("q1"), asst("a1", "r1"), user("q2"), asst("a2", "r2")),
    "tools_interleaved": conv(
        sys_("S"),
        user("Weather?"),
        asst("Checking.", "need tool", CALLS),
        tool("pong", "b"),
        tool("5C", "a"),
        asst("5C and pong.", "got it"),
        user("thanks"),
        asst("You're welcome."),
        tools=[WEATHER, ToolDefinition("ping")],
    ),
    "calls_without_tools": conv(user("q"), asst(calls=[ToolCall("ping", {"n": [1, {"x": None}], "s": "a\nb"})])),
    "reminder": conv(sys_("S"), Message("latest_reminder", "today"), user("q"), asst("a", "r")),
    "ends_on_user": conv(user("q1"), asst("a1", "r1"), user("q2")),
    "reasoning_only": conv(user("q"), asst(reasoning="thinking only")),
}
MODES = ("chat", "think", "think_max")


def _expected_visible(c: Conversation, index: int, mode: str) -> Message:
    """The rule of §9.4, written apart from the module: which assistant turns keep their reasoning."""
    msg = c.messages[index]
    later_user_turn = any(m.role in ("user", "tool") for m in c.messages[index + 1 :])
    keeps = mode != "chat" and (bool(c.tools) or not later_user_turn)
    return msg if keeps else Message("assistant", msg.content, tool_calls=msg.tool_calls)


def _without_ids(msg: Message) -> Message:
    calls = tuple(ToolCall(c.name, c.arguments) for c in msg.tool_calls)
    return Message(msg.role, msg.content, reasoning=msg.reasoning, tool_calls=calls)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_parse_of_each_assistant_turn_gives_the_message_back(name, mode):
    c = CASES[name]
    rendered = render_with_spans(c, mode)
    assert len(rendered.assistant_spans) == sum(m.role == "assistant" for m in c.messages)
    for span in rendered.assistant_spans:
        reply = parse(rendered.text[span.start : span.end])
        assert reply.ended
        expected = _without_ids(_expected_visible(c, span.message_index, mode))  # ids are not rendered
        assert reply.to_message() == expected
        assert visible_message(c, span.message_index, mode) == _expected_visible(c, span.message_index, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASES)
def test_render_parse_render_is_the_identity(name, mode):
    c = CASES[name]
    rendered = render_with_spans(c, mode)
    messages = list(c.messages)
    for span in rendered.assistant_spans:
        reply = parse(rendered.text[span.start : span.end])
        if not (reply.content or reply.reasoning or reply.tool_calls):
            continue  # the whole turn was reasoning that this mode drops: an empty turn is no message to re-render
        old_calls = messages[span.message_index].tool_calls
        calls = tuple(ToolCall(new.name, new.arguments, old.id) for new, old in zip(reply.tool_calls, old_calls))
        messages[span.message_index] = Message("assistant", reply.content, reasoning=reply.reasoning, tool_calls=calls)
    assert render(Conversation(tuple(messages), c.tools), mode) == rendered.text


@pytest.mark.parametrize("name", CASES)
def test_record_round_trip(name):
    c = CASES[name]
    record = json.loads(json.dumps(c.to_dict()))  # through jsonl
    assert Conversation.from_dict(record) == c


def test_record_form_is_openai_style():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": None,
                "reasoning": "r",
                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "ping", "arguments": '{"n": 1}'}}],
            },
            {"role": "tool", "tool_call_id": "x", "content": "pong"},
        ],
        "tools": [{"type": "function", "function": {"name": "ping"}}],
        "domain": "math",
    }
    c = Conversation.from_dict(record, ignore_keys={"domain"})
    assert c.messages[2] == asst("", "r", [ToolCall("ping", {"n": 1}, id="x")])
    assert c.tools == (ToolDefinition("ping"),)
    out = c.to_dict()
    assert out["messages"][2] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "r",
        "tool_calls": [{"id": "x", "type": "function", "function": {"name": "ping", "arguments": '{"n": 1}'}}],
    }
    # tools on the system message, as the encoder takes them
    on_system = {
        "messages": [{"role": "system", "content": "S", "tools": record["tools"]}, {"role": "user", "content": "q"}]
    }
    assert Conversation.from_dict(on_system).tools == (ToolDefinition("ping"),)


# ---------------------------------------------------------------------------------------------------------------
# Bad records: each error names the message and the problem
# ---------------------------------------------------------------------------------------------------------------


def _record(*messages, **extra):
    return {"messages": list(messages), **extra}


Q = {"role": "user", "content": "q"}
CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [{"id": "c", "function": {"name": "ping", "arguments": "{}"}}],
}
BAD_RECORDS = {
    "unknown role": (_record(Q, {"role": "robot", "content": "x"}), r"message 1: unknown role 'robot'"),
    "developer role": (_record({"role": "developer", "content": "x"}), r"message 0: unknown role 'developer'.*search"),
    "unknown message key": (
        _record({"role": "user", "content": "q", "name": "bob"}),
        r"message 0: unknown keys \['name'\]",
    ),
    "unknown record key": (_record(Q, domain="math"), r"record: unknown keys \['domain'\]"),
    "tool without call": (_record(Q, {"role": "tool", "content": "r"}), r"message 1: tool result without a preceding"),
    "tool after user": (_record(Q, CALL, Q, {"role": "tool", "content": "r"}), r"message 3: tool result without a"),
    "tool id unknown": (
        _record(Q, CALL, {"role": "tool", "content": "r", "tool_call_id": "zz"}),
        r"message 2: tool_call_id 'zz' is not one of message 1's calls",
    ),
    "more results than calls": (
        _record(Q, CALL, {"role": "tool", "content": "r"}, {"role": "tool", "content": "s"}),
        r"message 3: 2 tool results for the 1 calls of message 1",
    ),
    "empty assistant": (_record(Q, {"role": "assistant", "content": ""}), r"message 1: empty assistant turn"),
    "assistant first": (_record({"role": "assistant", "content": "a"}), r"message 0: an assistant turn must follow"),
    "two assistants": (
        _record(Q, {"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}),
        r"message 2: an assistant turn must follow a user turn or tool results, not a assistant",
    ),
    "system later": (
        _record(Q, {"role": "system", "content": "S"}),
        r"message 1: a system message may only be first",
    ),
    "special string": (_record({"role": "user", "content": "a<｜end▁of▁sentence｜>"}), r"message 0 content contains"),
    "think tag in reasoning": (
        _record(Q, {"role": "assistant", "content": "a", "reasoning_content": "x</think>y"}),
        r"message 1 reasoning contains the special string '</think>'",
    ),
    "content list": (_record({"role": "user", "content": [{"type": "text", "text": "q"}]}), r"message 0: content must"),
    "arguments not json": (
        _record(Q, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}),
        r"message 1 tool call 0 function arguments: not JSON",
    ),
    "arguments not object": (
        _record(Q, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}),
        r"message 1 tool call 0 function arguments: must be a JSON object",
    ),
    "nan argument": (
        _record(Q, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": math.nan}}}]}),
        r"message 1 tool call 0 parameter 'x' is not a finite JSON value",
    ),
    "quote in tool name": (
        _record(Q, {"role": "assistant", "tool_calls": [{"function": {"name": 'f"x', "arguments": {}}}]}),
        r"message 1 tool call 0 name",
    ),
    "both reasoning keys": (
        _record(Q, {"role": "assistant", "content": "a", "reasoning": "r", "reasoning_content": "r"}),
        r"message 1: give reasoning_content or reasoning, not both",
    ),
    "no messages": (_record(), r"a conversation needs at least one message"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_bad_records_name_the_message_and_the_problem(case):
    record, pattern = BAD_RECORDS[case]
    with pytest.raises(ChatFormatError, match=pattern):
        Conversation.from_dict(record)


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="mode 'thinking'"):
        render(CASES["plain"], "thinking")


# ---------------------------------------------------------------------------------------------------------------
# Parsing generated text: malformed DSML raises with the offset, never returns a call
# ---------------------------------------------------------------------------------------------------------------

INV = '<｜DSML｜invoke name="f">\n'
PS = '<｜DSML｜parameter name="s" string="true">hi</｜DSML｜parameter>\n'


def test_parse_reads_reasoning_content_and_calls():
    text = (
        "think</think>ans\n\n" + TC_OPEN + "\n" + INV + PS + '<｜DSML｜parameter name="n" string="false">[1]' + P_CLOSE
    )
    text += "\n" + INV_CLOSE + "\n" + TC_CLOSE + EOS
    reply = parse(text, expect_reasoning=True)
    assert (reply.reasoning, reply.content, reply.ended) == ("think", "ans", True)
    assert reply.tool_calls == (ToolCall("f", {"s": "hi", "n": [1]}),)


def test_parse_without_eos_reports_an_unfinished_turn():
    reply = parse("partial answ")
    assert (reply.content, reply.ended, reply.reasoning) == ("partial answ", False, None)


def _err(text, **kw):
    with pytest.raises(ChatParseError) as info:
        parse(text, **kw)
    return info.value


def test_unclosed_invoke():
    text = "a\n\n" + TC_OPEN + "\n" + INV + PS + TC_CLOSE + EOS
    err = _err(text)
    assert "unclosed invoke 'f'" in err.problem and err.offset == text.index(TC_CLOSE)


def test_unclosed_invoke_at_end_of_text():
    text = "a\n\n" + TC_OPEN + "\n" + INV + PS.rstrip("\n")
    err = _err(text)
    assert "unclosed invoke" in err.problem and err.offset == len(text)


def test_parameter_outside_invoke():
    text = "a\n\n" + TC_OPEN + "\n" + PS + TC_CLOSE + EOS
    err = _err(text)
    assert err.problem == "parameter outside invoke" and err.offset == text.index("<｜DSML｜parameter")
    after_invoke = "a\n\n" + TC_OPEN + "\n" + INV + PS + INV_CLOSE + "\n" + PS + TC_CLOSE + EOS
    err = _err(after_invoke)
    assert err.problem == "parameter outside invoke" and err.offset == after_invoke.rindex("<｜DSML｜parameter")


def test_bad_json_in_a_non_string_parameter():
    bad = '<｜DSML｜parameter name="n" string="false">{oops}' + P_CLOSE + "\n"
    text = "a\n\n" + TC_OPEN + "\n" + INV + bad + INV_CLOSE + "\n" + TC_CLOSE + EOS
    err = _err(text)
    assert "parameter 'n' has string=\"false\" but its value is not JSON" in err.problem
    assert err.offset == text.index("{oops}")
    nan = text.replace("{oops}", "NaN")
    assert "not JSON" in _err(nan).problem


def test_unknown_closing_tag():
    text = "a\n\n" + TC_OPEN + "\n" + INV + PS + "</｜DSML｜invok>\n" + TC_CLOSE + EOS
    err = _err(text)
    assert "unknown closing tag '</｜DSML｜invok>'" in err.problem and err.offset == text.index("</｜DSML｜invok>")
    block = "a\n\n" + TC_OPEN + "\n" + INV + PS + INV_CLOSE + "\n</｜DSML｜tool_call>" + EOS
    err = _err(block)
    assert "unknown closing tag '</｜DSML｜tool_call>'" in err.problem and err.offset == block.index(
        "</｜DSML｜tool_call>"
    )


def test_unclosed_parameter():
    text = "a\n\n" + TC_OPEN + "\n" + INV + '<｜DSML｜parameter name="s" string="true">hi\n' + INV_CLOSE
    err = _err(text + "\n" + TC_CLOSE + EOS)
    assert "parameter 's' is not closed" in err.problem and err.offset == text.index("hi")


def test_parameter_not_closed_before_the_next_parameter():
    first = '<｜DSML｜parameter name="s" string="true">hi\n'
    text = "a\n\n" + TC_OPEN + "\n" + INV + first + PS + INV_CLOSE + "\n" + TC_CLOSE + EOS
    err = _err(text)
    assert "parameter 's' is not closed" in err.problem and err.offset == text.index("hi")


def test_special_string_in_the_answer_before_the_calls():
    text = "x<｜User｜>y\n\n" + TC_OPEN + "\n" + INV + PS + INV_CLOSE + "\n" + TC_CLOSE + EOS
    err = _err(text)
    assert "unexpected '<｜User｜>' inside the answer" in err.problem and err.offset == 1


def test_bad_string_flag_and_duplicate_parameter():
    flag = "a\n\n" + TC_OPEN + "\n" + INV + '<｜DSML｜parameter name="s" string="yes">hi' + P_CLOSE
    err = _err(flag)
    assert "expected 'true\">' or 'false\">'" in err.problem and err.offset == flag.index("yes")
    dup = "a\n\n" + TC_OPEN + "\n" + INV + PS + PS + INV_CLOSE + "\n" + TC_CLOSE + EOS
    err = _err(dup)
    assert "parameter 's' appears twice" in err.problem and err.offset == dup.rindex("<｜DSML｜parameter")


def test_tool_calls_block_needs_a_blank_line_and_an_invoke():
    glued = "a" + TC_OPEN + "\n" + INV + PS + INV_CLOSE + "\n" + TC_CLOSE + EOS
    err = _err(glued)
    assert "unexpected '｜DSML｜' inside the answer" in err.problem and err.offset == 2
    empty = "a\n\n" + TC_OPEN + "\n" + TC_CLOSE + EOS
    assert "expected '<｜DSML｜invoke'" in _err(empty).problem


def test_text_after_the_calls_or_after_eos():
    calls = "a\n\n" + TC_OPEN + "\n" + INV + PS + INV_CLOSE + "\n" + TC_CLOSE
    err = _err(calls + " and more" + EOS)
    assert "unexpected text after the tool calls" in err.problem and err.offset == len(calls)
    err = _err("done" + EOS + "more")
    assert "unexpected text after EOS" in err.problem and err.offset == len("done" + EOS)


def test_reasoning_expectations_and_stray_tokens():
    err = _err("no end of thought" + EOS, expect_reasoning=True)
    assert "expected '</think>'" in err.problem
    err = _err("r</think>a" + EOS, expect_reasoning=False)
    assert err.offset == 1
    err = _err("x<think>y</think>a" + EOS)
    assert "unexpected '<think>' inside the reasoning" in err.problem and err.offset == 1
    err = _err("hello<｜User｜>" + EOS)
    assert "unexpected '<｜User｜>' inside the answer" in err.problem and err.offset == 5


def test_message_validation_is_also_applied_to_dataclasses():
    with pytest.raises(ChatFormatError, match="message 1: empty assistant turn"):
        conv(user("q"), asst(""))
    with pytest.raises(ChatFormatError, match="tool 1: a second tool is named 'weather'"):
        conv(user("q"), tools=[WEATHER, WEATHER])
