"""DeepSeek-V4's chat format as text: render a conversation, parse one generated assistant turn back.

The rules follow DeepSeek's own Python encoder (`encoding/encoding_dsv4.py` shipped with the V4 weights; there is no
Jinja template) and `reference/dsv4-architecture.md` §9.4. This module is only the text layer: token ids, reserving
the special strings in our tokenizers, the HF Jinja template and SFT come later, on top of `render_with_spans`.

Layout of a rendered conversation (`｜` is the full-width bar U+FF5C)::

    <｜begin▁of▁sentence｜>[think-max instruction]system text[\\n\\n## Tools preamble]
    <｜User｜>question<｜Assistant｜></think>answer<｜end▁of▁sentence｜>                  chat mode, or an earlier turn
    <｜User｜>question<｜Assistant｜><think>reasoning</think>answer<｜end▁of▁sentence｜>  thinking mode, last user turn

Rules, each one a test in tests/unit/test_chat.py:

- Modes: `chat` opens every answer with `</think>` (the thinking block closes at once; reasoning is never rendered);
  `think` opens the turn after the last user turn with `<think>` and renders that turn's reasoning then `</think>`;
  earlier turns look like chat-mode turns with their reasoning dropped. `think_max` is `think` plus the encoder's
  `REASONING_EFFORT_MAX` instruction right after BOS, before the system text (the encoder's "high" effort adds
  nothing, so it is not a mode of its own).
- Tools: when the conversation defines tools, the system text is followed by a blank line and the "## Tools"
  preamble, and in thinking modes *every* user turn opens with `<think>` and every assistant turn keeps its
  reasoning (V4's interleaved thinking for agents).
- Tool calls are a DSML block after the answer and a blank line: `<｜DSML｜tool_calls>`, one `<｜DSML｜invoke
  name="…">` per call, one `<｜DSML｜parameter name="k" string="true|false">` per argument, each on its own line.
  Strings are written raw with `string="true"`; every other value is JSON (`ensure_ascii=False`) with
  `string="false"`.
- There is no tool role in the text: tool results become a user turn of `<tool_result>…</tool_result>` blocks joined
  by blank lines, in the order of the calls (by `tool_call_id` when the results carry ids), then that turn opens the
  next answer like any user turn. A user message right after tool results (or after another user message) joins the
  same user turn after a blank line, as the encoder's `merge_tool_messages` does.
- `latest_reminder` renders as `<｜latest_reminder｜>text` with no opening after it. It belongs before the user turn it
  qualifies; placed after a user turn, the encoder (and so this module) writes the assistant opening first and the
  reminder after it.
- Every assistant turn ends with EOS. `render_with_spans` returns the character spans the model generates (after
  the opening, through EOS): SFT turns them into loss masks.

Where this module differs from, or narrows, the encoder (on purpose):

- Record keys: OpenAI style. Reasoning is read from `reasoning_content` (DeepSeek's API and the encoder shipped with
  the weights) or `reasoning` (vLLM's copy of the encoder renamed it); `to_dict` writes `reasoning_content`. Tool
  call arguments are read as a JSON-object string (OpenAI) or a dict; `to_dict` writes the JSON string. Tools are a
  top-level `tools` list of `{"type": "function", "function": {...}}` (the encoder takes them on the system message;
  that form is read too). The tool schema is rendered with keys in the order name, description, parameters.
- Tools without a system message render as if the conversation began with an empty system message (the encoder
  renders the preamble only on a system message).
- Not supported (a clear error names them): the `developer` role (internal search agent, not accepted by the API),
  quick-instruction `task` tokens, `response_format`, content given as a list of blocks, images, `wo_eos`, a system
  message anywhere but first.
- Validation the encoder does not do: unknown roles or keys; a tool result with no call before it, or with a
  `tool_call_id` that no call of the preceding assistant turn has; an empty assistant turn; two assistant turns in a
  row; special strings (BOS, EOS, role tokens, `<think>`, `</think>`, `｜DSML｜`) inside any text, which would make
  the text unparseable or let data inject turns; argument values that are not finite JSON.
- Empty reasoning and no reasoning are the same message here (`reasoning=""` is stored as None): in a thinking turn
  the text `</think>answer` cannot tell them apart.
- `add_generation_prompt=False` leaves out the final `<｜Assistant｜>` opening after a last user turn (the encoder
  always writes it); True, the default, matches the encoder. After a last assistant turn it changes nothing.
- `parse` is stricter than the encoder's `parse_message_from_completion_text`: every DSML deviation raises
  `ChatParseError` with the offset and what was expected, instead of an assert or a silently accepted call.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
LATEST_REMINDER = "<｜latest_reminder｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
SPECIAL_STRINGS = (BOS, EOS, USER, ASSISTANT, LATEST_REMINDER, THINK_START, THINK_END, DSML)

TOOL_CALLS_OPEN = f"<{DSML}tool_calls>"
TOOL_CALLS_CLOSE = f"</{DSML}tool_calls>"
INVOKE_OPEN = f"<{DSML}invoke"
INVOKE_CLOSE = f"</{DSML}invoke>"
PARAMETER_OPEN = f"<{DSML}parameter"
PARAMETER_CLOSE = f"</{DSML}parameter>"
TOOL_RESULT_OPEN, TOOL_RESULT_CLOSE = "<tool_result>", "</tool_result>"

# The encoder's REASONING_EFFORT_MAX, written right after BOS in think_max mode.
THINK_MAX_INSTRUCTION = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, "
    "rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n"
)

# The encoder's TOOLS_TEMPLATE with its tokens filled in; `{tool_schemas}` is one JSON object per line.
TOOLS_PREAMBLE = (
    "## Tools\n\n"
    "You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "
    f'"{TOOL_CALLS_OPEN}" block like the following:\n\n'
    f"{TOOL_CALLS_OPEN}\n"
    f'{INVOKE_OPEN} name="$TOOL_NAME">\n'
    f'{PARAMETER_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f'{INVOKE_OPEN} name="$TOOL_NAME2">\n'
    "...\n"
    f"{INVOKE_CLOSE}\n"
    f"{TOOL_CALLS_CLOSE}\n\n"
    'String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, '
    'arrays, objects), pass the value in JSON format and set `string="false"`.\n\n'
    f"If thinking_mode is enabled (triggered by {THINK_START}), you MUST output your complete reasoning inside "
    f"{THINK_START}...{THINK_END} BEFORE any tool calls or final response.\n\n"
    f"Otherwise, output directly after {THINK_END} with tool calls or final response.\n\n"
    "### Available Tool Schemas\n\n"
    "{tool_schemas}\n\n"
    "You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.\n"
)

Role = Literal["system", "user", "assistant", "tool", "latest_reminder"]
Mode = Literal["chat", "think", "think_max"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool", "latest_reminder")
MODES: tuple[str, ...] = ("chat", "think", "think_max")


class ChatFormatError(ValueError):
    """A conversation or record that the V4 format cannot represent; the message names the index and the problem."""


class ChatParseError(ValueError):
    """Generated text that is not one well-formed V4 assistant turn. `offset` is a character index into that text."""

    def __init__(self, offset: int, problem: str):
        super().__init__(f"at character {offset}: {problem}")
        self.offset = offset
        self.problem = problem


# ----------------------------------------------------------------------------------------------------------------
# Data model
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """One call: `arguments` maps parameter names to JSON values. `id` only pairs results with calls; not rendered."""

    name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    id: str | None = None


@dataclass(frozen=True)
class ToolDefinition:
    """One tool of the system prompt's "## Tools" preamble (the `function` object of OpenAI's tool format)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def schema_json(self) -> str:
        schema: dict[str, Any] = {"name": self.name}
        if self.description is not None:
            schema["description"] = self.description
        if self.parameters is not None:
            schema["parameters"] = self.parameters
        return json.dumps(schema, ensure_ascii=False)


@dataclass(frozen=True)
class Message:
    """One message. `reasoning` and `tool_calls` are for assistants, `tool_call_id` for tool results."""

    role: Role
    content: str = ""
    reasoning: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self):
        if self.reasoning == "":  # the text cannot tell empty reasoning from none (module docstring)
            object.__setattr__(self, "reasoning", None)
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


@dataclass(frozen=True)
class Conversation:
    """Messages plus the tools they may call; validated when built, so every Conversation renders and parses back."""

    messages: tuple[Message, ...]
    tools: tuple[ToolDefinition, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "messages", tuple(self.messages))
        object.__setattr__(self, "tools", tuple(self.tools))
        validate(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any], ignore_keys: Collection[str] = ()) -> Conversation:
        """Read a jsonl record `{"messages": [...], "tools": [...]}`; `ignore_keys` are the caller's (domain, mode)."""
        return conversation_from_dict(record, ignore_keys)

    def to_dict(self) -> dict[str, Any]:
        return conversation_to_dict(self)


@dataclass(frozen=True)
class AssistantSpan:
    """Characters `text[start:end]` that the model generates for `messages[message_index]` (through its EOS)."""

    message_index: int
    start: int
    end: int


@dataclass(frozen=True)
class Rendered:
    text: str
    assistant_spans: tuple[AssistantSpan, ...]


@dataclass(frozen=True)
class ParsedReply:
    """One generated assistant turn. `reasoning` is None when there was none; `ended` says whether EOS was seen."""

    reasoning: str | None
    content: str
    tool_calls: tuple[ToolCall, ...]
    ended: bool = True

    def to_message(self) -> Message:
        return Message(role="assistant", content=self.content, reasoning=self.reasoning, tool_calls=self.tool_calls)


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------


def _check_text(text: Any, where: str) -> None:
    if not isinstance(text, str):
        raise ChatFormatError(f"{where} must be a string, got {type(text).__name__}")
    for special in SPECIAL_STRINGS:
        if special in text:
            raise ChatFormatError(
                f"{where} contains the special string {special!r}; it would be read as a format token, remove it"
            )


def _check_name(name: Any, where: str) -> None:
    _check_text(name, where)
    if not name or any(c in name for c in '"<>\n'):
        raise ChatFormatError(f"{where} {name!r} must be non-empty and free of '\"', '<', '>' and newlines")


def _check_json_value(value: Any, where: str) -> None:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise ChatFormatError(f"{where} is not a finite JSON value: {err}") from None


def _check_tool_call(call: ToolCall, where: str) -> None:
    _check_name(call.name, f"{where} name")
    if not isinstance(call.arguments, dict):
        raise ChatFormatError(f"{where} arguments must be a dict of parameter name to value")
    for key, value in call.arguments.items():
        _check_name(key, f"{where} parameter name")
        if isinstance(value, str):
            _check_text(value, f"{where} parameter {key!r}")
        else:
            _check_json_value(value, f"{where} parameter {key!r}")


def _previous_non_reminder(messages: Sequence[Message], index: int) -> Message | None:
    for j in range(index - 1, -1, -1):
        if messages[j].role != "latest_reminder":
            return messages[j]
    return None


def _check_tool_result(messages: Sequence[Message], index: int) -> None:
    """A tool result follows an assistant turn with calls (maybe through other results) and names one of its calls."""
    j = index - 1
    while j >= 0 and messages[j].role == "tool":
        j -= 1
    caller = messages[j] if j >= 0 else None
    if caller is None or caller.role != "assistant" or not caller.tool_calls:
        raise ChatFormatError(f"message {index}: tool result without a preceding assistant turn that made tool calls")
    results = messages[j + 1 : index + 1]
    if len(results) > len(caller.tool_calls):
        raise ChatFormatError(
            f"message {index}: {len(results)} tool results for the {len(caller.tool_calls)} calls of message {j}"
        )
    msg = messages[index]
    if msg.tool_call_id is None:
        if any(r.tool_call_id is not None for r in results):
            raise ChatFormatError(f"message {index}: give tool_call_id on every result of message {j}'s calls or none")
        return
    call_ids = [c.id for c in caller.tool_calls]
    if msg.tool_call_id not in call_ids:
        raise ChatFormatError(
            f"message {index}: tool_call_id {msg.tool_call_id!r} is not one of message {j}'s calls {call_ids}"
        )
    if [r.tool_call_id for r in results].count(msg.tool_call_id) > 1 or results[0].tool_call_id is None:
        raise ChatFormatError(f"message {index}: tool_call_id {msg.tool_call_id!r} repeated, or mixed with no ids")


def validate(conversation: Conversation) -> None:
    """Raise ChatFormatError naming the first message that the format cannot represent."""
    names = set()
    for k, tool in enumerate(conversation.tools):
        _check_name(tool.name, f"tool {k} name")
        if tool.description is not None:
            _check_text(tool.description, f"tool {k} description")
        if tool.parameters is not None and not isinstance(tool.parameters, dict):
            raise ChatFormatError(f"tool {k} parameters must be a JSON-schema object")
        _check_json_value(tool.parameters, f"tool {k} parameters")
        if tool.name in names:
            raise ChatFormatError(f"tool {k}: a second tool is named {tool.name!r}")
        names.add(tool.name)
    messages = conversation.messages
    if not messages:
        raise ChatFormatError("a conversation needs at least one message")
    for i, msg in enumerate(messages):
        if msg.role not in ROLES:
            hint = " (the internal search agent's role is not supported)" if msg.role == "developer" else ""
            raise ChatFormatError(f"message {i}: unknown role {msg.role!r}{hint}; expected one of {ROLES}")
        _check_text(msg.content, f"message {i} content")
        if msg.role != "assistant" and (msg.reasoning is not None or msg.tool_calls):
            raise ChatFormatError(f"message {i}: only assistant messages carry reasoning or tool_calls")
        if msg.role != "tool" and msg.tool_call_id is not None:
            raise ChatFormatError(f"message {i}: only tool messages carry tool_call_id")
        if msg.tool_call_id is not None and not isinstance(msg.tool_call_id, str):
            raise ChatFormatError(f"message {i}: tool_call_id must be a string")
        if msg.role == "system" and i != 0:
            raise ChatFormatError(f"message {i}: a system message may only be first")
        if msg.role == "tool":
            _check_tool_result(messages, i)
        if msg.role == "assistant":
            _check_assistant(messages, i)


def _check_assistant(messages: Sequence[Message], i: int) -> None:
    msg = messages[i]
    if msg.reasoning is not None:
        _check_text(msg.reasoning, f"message {i} reasoning")
    if not msg.content and msg.reasoning is None and not msg.tool_calls:
        raise ChatFormatError(f"message {i}: empty assistant turn (no content, reasoning or tool calls)")
    for k, call in enumerate(msg.tool_calls):
        _check_tool_call(call, f"message {i} tool call {k}")
        if call.id is not None and not isinstance(call.id, str):
            raise ChatFormatError(f"message {i} tool call {k}: id must be a string")
    ids = [c.id for c in msg.tool_calls if c.id is not None]
    if len(ids) != len(set(ids)):
        raise ChatFormatError(f"message {i}: two tool calls share an id {ids}")
    before = _previous_non_reminder(messages, i)
    if before is None or before.role not in ("user", "tool"):
        found = "the start of the conversation" if before is None else f"a {before.role} message"
        raise ChatFormatError(f"message {i}: an assistant turn must follow a user turn or tool results, not {found}")


# ----------------------------------------------------------------------------------------------------------------
# Records (OpenAI-style dicts)
# ----------------------------------------------------------------------------------------------------------------

_MESSAGE_KEYS = {
    "system": {"role", "content", "tools"},
    "user": {"role", "content"},
    "assistant": {"role", "content", "reasoning_content", "reasoning", "tool_calls"},
    "tool": {"role", "content", "tool_call_id"},
    "latest_reminder": {"role", "content"},
}


def _reject_unknown_keys(obj: Mapping[str, Any], allowed: Collection[str], where: str) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ChatFormatError(f"{where}: unknown keys {unknown}; expected some of {sorted(allowed)}")


def _require_mapping(obj: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(obj, Mapping):
        raise ChatFormatError(f"{where} must be an object, got {type(obj).__name__}")
    return obj


def tool_definition_from_dict(obj: Any, where: str) -> ToolDefinition:
    obj = _require_mapping(obj, where)
    _reject_unknown_keys(obj, {"type", "function"}, where)
    if obj.get("type", "function") != "function" or "function" not in obj:
        raise ChatFormatError(f'{where}: expected {{"type": "function", "function": {{"name": ...}}}}')
    fn = _require_mapping(obj["function"], f"{where} function")
    _reject_unknown_keys(fn, {"name", "description", "parameters"}, f"{where} function")
    if "name" not in fn:
        raise ChatFormatError(f"{where} function: missing name")
    return ToolDefinition(name=fn["name"], description=fn.get("description"), parameters=fn.get("parameters"))


def tool_call_from_dict(obj: Any, where: str) -> ToolCall:
    obj = _require_mapping(obj, where)
    _reject_unknown_keys(obj, {"id", "type", "function"}, where)
    if obj.get("type", "function") != "function" or "function" not in obj:
        expected = '{"type": "function", "function": {"name": ..., "arguments": ...}}'
        raise ChatFormatError(f"{where}: expected {expected}")
    fn = _require_mapping(obj["function"], f"{where} function")
    _reject_unknown_keys(fn, {"name", "arguments"}, f"{where} function")
    if "name" not in fn:
        raise ChatFormatError(f"{where} function: missing name")
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as err:
            raise ChatFormatError(f"{where} function arguments: not JSON ({err})") from None
    if not isinstance(arguments, dict):
        raise ChatFormatError(f"{where} function arguments: must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(name=fn["name"], arguments=arguments, id=obj.get("id"))


def message_from_dict(obj: Any, index: int) -> tuple[Message, tuple[ToolDefinition, ...]]:
    """One message, plus the tools when they ride on a system message (the encoder's form)."""
    where = f"message {index}"
    obj = _require_mapping(obj, where)
    role = obj.get("role")
    if role not in _MESSAGE_KEYS:
        hint = " (the internal search agent's role is not supported)" if role == "developer" else ""
        raise ChatFormatError(f"{where}: unknown role {role!r}{hint}; expected one of {ROLES}")
    _reject_unknown_keys(obj, _MESSAGE_KEYS[role], where)
    content = obj.get("content")
    if content is None and role == "assistant":
        content = ""  # OpenAI writes null content on a pure tool-call turn
    if not isinstance(content, str):
        got = "nothing" if content is None else type(content).__name__
        raise ChatFormatError(f"{where}: content must be a string (content-block lists are not supported), got {got}")
    if "reasoning_content" in obj and "reasoning" in obj:
        raise ChatFormatError(f"{where}: give reasoning_content or reasoning, not both")
    reasoning = obj.get("reasoning_content", obj.get("reasoning"))
    raw_calls = obj.get("tool_calls") or []
    if not isinstance(raw_calls, list):
        raise ChatFormatError(f"{where}: tool_calls must be a list")
    calls = tuple(tool_call_from_dict(c, f"{where} tool call {k}") for k, c in enumerate(raw_calls))
    raw_tools = obj.get("tools") or []
    if not isinstance(raw_tools, list):
        raise ChatFormatError(f"{where}: tools must be a list")
    tools = tuple(tool_definition_from_dict(t, f"{where} tool {k}") for k, t in enumerate(raw_tools))
    message = Message(
        role=role, content=content, reasoning=reasoning, tool_calls=calls, tool_call_id=obj.get("tool_call_id")
    )
    return message, tools


def conversation_from_dict(record: Mapping[str, Any], ignore_keys: Collection[str] = ()) -> Conversation:
    record = _require_mapping(record, "record")
    _reject_unknown_keys(record, {"messages", "tools", *ignore_keys}, "record")
    raw_messages = record.get("messages")
    if not isinstance(raw_messages, list):
        raise ChatFormatError('record: "messages" must be a list of messages')
    raw_tools = record.get("tools") or []
    if not isinstance(raw_tools, list):
        raise ChatFormatError('record: "tools" must be a list')
    tools = tuple(tool_definition_from_dict(t, f"tool {k}") for k, t in enumerate(raw_tools))
    messages = []
    for i, raw in enumerate(raw_messages):
        message, message_tools = message_from_dict(raw, i)
        if message_tools and tools:
            raise ChatFormatError(f"message {i}: tools are given both on the record and on the system message")
        tools = tools or message_tools
        messages.append(message)
    return Conversation(messages=tuple(messages), tools=tools)


def _tool_call_to_dict(call: ToolCall) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if call.id is not None:
        out["id"] = call.id
    out["type"] = "function"
    out["function"] = {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}
    return out


def _tool_definition_to_dict(tool: ToolDefinition) -> dict[str, Any]:
    return {"type": "function", "function": json.loads(tool.schema_json())}


def message_to_dict(msg: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": msg.role, "content": msg.content}
    if msg.reasoning is not None:
        out["reasoning_content"] = msg.reasoning
    if msg.tool_calls:
        out["tool_calls"] = [_tool_call_to_dict(c) for c in msg.tool_calls]
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    return out


def conversation_to_dict(conversation: Conversation) -> dict[str, Any]:
    out: dict[str, Any] = {"messages": [message_to_dict(m) for m in conversation.messages]}
    if conversation.tools:
        out["tools"] = [_tool_definition_to_dict(t) for t in conversation.tools]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Turn:
    """A unit of the text: tool results and adjacent user text are one user turn (the encoder's merged message)."""

    kind: Literal["system", "user", "assistant", "latest_reminder"]
    parts: tuple[str, ...] = ()
    message_index: int = -1  # for assistant turns: the message it renders


def render_tools_preamble(tools: Sequence[ToolDefinition]) -> str:
    return TOOLS_PREAMBLE.replace("{tool_schemas}", "\n".join(t.schema_json() for t in tools))


def render_tool_calls(calls: Sequence[ToolCall]) -> str:
    """The DSML block, without the blank line that separates it from the answer."""
    invokes = []
    for call in calls:
        params = "\n".join(
            f'{PARAMETER_OPEN} name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
            f"{value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)}{PARAMETER_CLOSE}"
            for key, value in call.arguments.items()
        )
        invokes.append(f'{INVOKE_OPEN} name="{call.name}">\n{params}\n{INVOKE_CLOSE}')
    return TOOL_CALLS_OPEN + "\n" + "\n".join(invokes) + "\n" + TOOL_CALLS_CLOSE


def _ordered_results(results: Sequence[Message], caller: Message) -> list[Message]:
    """Tool results in the order of the calls; without ids they are taken to be in that order already."""
    if results[0].tool_call_id is None:
        return list(results)
    position = {c.id: k for k, c in enumerate(caller.tool_calls)}
    return sorted(results, key=lambda r: position[r.tool_call_id])


def _turns(conversation: Conversation) -> list[_Turn]:
    messages = conversation.messages
    turns: list[_Turn] = []
    if conversation.tools and messages[0].role != "system":
        turns.append(_Turn("system", ("",)))
    i = 0
    while i < len(messages):
        msg = messages[i]
        if msg.role == "tool":
            j = i
            while j < len(messages) and messages[j].role == "tool":
                j += 1
            caller = messages[i - 1]
            blocks = [TOOL_RESULT_OPEN + r.content + TOOL_RESULT_CLOSE for r in _ordered_results(messages[i:j], caller)]
            turns.append(_Turn("user", tuple(blocks)))
            i = j
            continue
        if msg.role == "user" and turns and turns[-1].kind == "user":
            turns[-1] = _Turn("user", (*turns[-1].parts, msg.content))
        elif msg.role == "assistant":
            turns.append(_Turn("assistant", message_index=i))
        else:
            turns.append(_Turn(msg.role, (msg.content,)))
        i += 1
    return turns


def render_with_spans(conversation: Conversation, mode: Mode = "chat", add_generation_prompt: bool = True) -> Rendered:
    """The V4 text of `conversation` and the spans of it that the model generates (module docstring for the rules)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    thinking = mode != "chat"
    keep_all_reasoning = bool(conversation.tools)  # interleaved thinking for agents
    turns = _turns(conversation)
    last_user = max((k for k, t in enumerate(turns) if t.kind == "user"), default=-1)

    pieces = [BOS]
    length = len(BOS)
    spans = []

    def emit(s: str) -> None:
        nonlocal length
        pieces.append(s)
        length += len(s)

    if mode == "think_max":
        emit(THINK_MAX_INSTRUCTION)
    for k, turn in enumerate(turns):
        if turn.kind == "system":
            emit(turn.parts[0] + ("\n\n" + render_tools_preamble(conversation.tools) if conversation.tools else ""))
        elif turn.kind == "latest_reminder":
            emit(LATEST_REMINDER + turn.parts[0])
        elif turn.kind == "user":
            emit(USER + "\n\n".join(turn.parts))
            following = turns[k + 1].kind if k + 1 < len(turns) else None
            if following in ("assistant", "latest_reminder") or (following is None and add_generation_prompt):
                opens_thinking = thinking and (keep_all_reasoning or k == last_user)
                emit(ASSISTANT + (THINK_START if opens_thinking else THINK_END))
        else:
            msg = conversation.messages[turn.message_index]
            start = length
            if thinking and (keep_all_reasoning or k > last_user):
                emit((msg.reasoning or "") + THINK_END)
            emit(msg.content)
            if msg.tool_calls:
                emit("\n\n" + render_tool_calls(msg.tool_calls))
            emit(EOS)
            spans.append(AssistantSpan(turn.message_index, start, length))
    return Rendered("".join(pieces), tuple(spans))


def render(conversation: Conversation, mode: Mode = "chat", add_generation_prompt: bool = True) -> str:
    """The V4 text of `conversation`, as DeepSeek's encoder writes it."""
    return render_with_spans(conversation, mode, add_generation_prompt).text


def visible_message(conversation: Conversation, index: int, mode: Mode) -> Message:
    """`messages[index]` as the text of `mode` shows it: the reasoning a dropped turn loses is removed."""
    msg = conversation.messages[index]
    if msg.role != "assistant":
        return msg
    if mode == "chat":
        return replace(msg, reasoning=None)
    if conversation.tools:
        return msg
    later_user = any(m.role in ("user", "tool") for m in conversation.messages[index + 1 :])
    return replace(msg, reasoning=None) if later_user else msg


# ----------------------------------------------------------------------------------------------------------------
# Parsing one generated assistant turn
# ----------------------------------------------------------------------------------------------------------------


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class _Reader:
    """A cursor over the generated text; every failed expectation becomes a ChatParseError at the cursor."""

    def __init__(self, text: str):
        self.text = text
        self.pos = 0

    def at(self, literal: str) -> bool:
        return self.text.startswith(literal, self.pos)

    def found(self) -> str:
        """What stands at the cursor, for error messages: a whole tag when it is one, else a few characters."""
        rest = self.text[self.pos :]
        if not rest:
            return "the end of the text"
        if rest.startswith("<"):
            close = rest.find(">")
            if 0 < close < 80:
                return repr(rest[: close + 1])
        return repr(rest[:20])

    def expect(self, literal: str, context: str = "") -> None:
        if not self.at(literal):
            raise ChatParseError(self.pos, f"expected {literal!r}{context} but found {self.found()}")
        self.pos += len(literal)

    def read_until(self, terminator: str, what: str) -> str:
        end = self.text.find(terminator, self.pos)
        if end < 0:
            raise ChatParseError(self.pos, f"{what} is not closed: no {terminator!r} follows")
        value = self.text[self.pos : end]
        self.pos = end + len(terminator)
        return value


def _check_free_of_special(text: str, base: int, what: str, allowed: Collection[str] = ()) -> None:
    hits = [(text.find(s), s) for s in SPECIAL_STRINGS if s not in allowed and s in text]
    if hits:
        offset, special = min(hits)
        raise ChatParseError(base + offset, f"unexpected {special!r} inside the {what}")


def _read_name_attribute(reader: _Reader, closing: str, what: str) -> str:
    """`name="…"` followed by `closing`; the name may not span a quote or a newline."""
    reader.expect(' name="', f" in the {what} tag")
    start = reader.pos
    end = reader.text.find('"', start)
    if end < 0 or "\n" in reader.text[start:end]:
        raise ChatParseError(start, f"the {what} name is not closed by '\"'")
    name = reader.text[start:end]
    if not name or DSML in name:
        raise ChatParseError(start, f"bad {what} name {name!r}")
    reader.pos = end + 1
    reader.expect(closing, f" after the {what} name")
    return name


def _parse_parameter(reader: _Reader) -> tuple[str, Any]:
    name = _read_name_attribute(reader, ' string="', "parameter")
    if reader.at('true">'):
        is_string = True
    elif reader.at('false">'):
        is_string = False
    else:
        raise ChatParseError(reader.pos, f"expected 'true\">' or 'false\">' after string= but found {reader.found()}")
    reader.pos += len('true">') if is_string else len('false">')
    start = reader.pos
    close = reader.text.find(PARAMETER_CLOSE, start)
    marker = reader.text.find(DSML, start)
    if close < 0 or marker != close + 2:  # the first DSML marker after the value must be PARAMETER_CLOSE's own
        raise ChatParseError(start, f"parameter {name!r} is not closed by {PARAMETER_CLOSE!r} before the next DSML tag")
    raw = reader.text[start:close]
    _check_free_of_special(raw, start, f"value of parameter {name!r}")
    reader.pos = close + len(PARAMETER_CLOSE)
    if is_string:
        return name, raw
    try:
        return name, json.loads(raw, parse_constant=_reject_json_constant)
    except ValueError as err:
        problem = f'parameter {name!r} has string="false" but its value is not JSON ({err})'
        raise ChatParseError(start, problem) from None


def _parse_invoke(reader: _Reader) -> ToolCall:
    opened_at = reader.pos
    reader.expect(INVOKE_OPEN)
    name = _read_name_attribute(reader, ">\n", "invoke")
    arguments: dict[str, Any] = {}
    if not reader.at(PARAMETER_OPEN):  # a call without arguments is rendered `">\n\n</…invoke>`
        if reader.at("\n" + INVOKE_CLOSE):
            reader.pos += 1 + len(INVOKE_CLOSE)
            return ToolCall(name=name, arguments=arguments)
        _raise_inside_invoke(reader, name, opened_at, PARAMETER_OPEN)
    while True:
        param_at = reader.pos
        reader.expect(PARAMETER_OPEN)
        key, value = _parse_parameter(reader)
        if key in arguments:
            raise ChatParseError(param_at, f"parameter {key!r} appears twice in invoke {name!r}")
        arguments[key] = value
        if reader.at("\n" + PARAMETER_OPEN):
            reader.pos += 1
        elif reader.at("\n" + INVOKE_CLOSE):
            reader.pos += 1 + len(INVOKE_CLOSE)
            return ToolCall(name=name, arguments=arguments)
        else:
            if reader.at("\n"):
                reader.pos += 1
            _raise_inside_invoke(reader, name, opened_at, f"{PARAMETER_OPEN!r} or {INVOKE_CLOSE!r} on a new line")


def _raise_inside_invoke(reader: _Reader, name: str, opened_at: int, expected: str) -> None:
    rest = reader.text[reader.pos :]
    if not rest or rest.startswith((TOOL_CALLS_CLOSE, EOS, INVOKE_OPEN)):
        raise ChatParseError(reader.pos, f"unclosed invoke {name!r} (opened at character {opened_at})")
    if rest.startswith("</" + DSML):
        raise ChatParseError(reader.pos, f"unknown closing tag {reader.found()} inside invoke {name!r}")
    raise ChatParseError(reader.pos, f"expected {expected} inside invoke {name!r} but found {reader.found()}")


def _parse_tool_calls_block(reader: _Reader) -> tuple[ToolCall, ...]:
    reader.expect(TOOL_CALLS_OPEN + "\n")
    calls: list[ToolCall] = []
    while True:
        if reader.at(INVOKE_OPEN):
            calls.append(_parse_invoke(reader))
            reader.expect("\n", f" after {INVOKE_CLOSE!r}")
        elif reader.at(TOOL_CALLS_CLOSE) and calls:
            reader.pos += len(TOOL_CALLS_CLOSE)
            return tuple(calls)
        elif reader.at(PARAMETER_OPEN):
            raise ChatParseError(reader.pos, "parameter outside invoke")
        elif reader.at("</" + DSML):
            expected = f"{INVOKE_OPEN!r}" + (f" or {TOOL_CALLS_CLOSE!r}" if calls else "")
            raise ChatParseError(reader.pos, f"unknown closing tag {reader.found()}; expected {expected}")
        else:
            expected = f"{INVOKE_OPEN!r}" + (f" or {TOOL_CALLS_CLOSE!r}" if calls else "")
            raise ChatParseError(reader.pos, f"expected {expected} but found {reader.found()}")


def parse(text: str, expect_reasoning: bool | None = None) -> ParsedReply:
    """Read one generated assistant turn: what follows the generation prompt, through EOS if the model wrote it.

    `expect_reasoning`: True after a `<think>` opening (text must hold `</think>`), False after `</think>` (it must
    not), None to accept either. Anything that is not exactly the rendered form raises ChatParseError; a call is
    never returned from text that does not parse completely.
    """
    reader = _Reader(text)
    reasoning = None
    think_end = text.find(THINK_END)
    if expect_reasoning is True and think_end < 0:
        raise ChatParseError(len(text), f"the reasoning is not closed: expected {THINK_END!r}")
    if expect_reasoning is False and think_end >= 0:
        raise ChatParseError(think_end, f"unexpected {THINK_END!r}: this turn was opened without thinking")
    if think_end >= 0:
        reasoning = text[:think_end]
        _check_free_of_special(reasoning, 0, "reasoning")
        reader.pos = think_end + len(THINK_END)
    content_start = reader.pos
    eos = text.find(EOS, content_start)
    block = text.find("\n\n" + TOOL_CALLS_OPEN, content_start)
    calls: tuple[ToolCall, ...] = ()
    if block >= 0 and (eos < 0 or block < eos):
        content = text[content_start:block]
        _check_free_of_special(content, content_start, "answer")
        reader.pos = block + 2
        calls = _parse_tool_calls_block(reader)
    else:
        content_end = len(text) if eos < 0 else eos
        content = text[content_start:content_end]
        _check_free_of_special(content, content_start, "answer")
        reader.pos = content_end
    ended = reader.at(EOS)
    if ended:
        reader.pos += len(EOS)
    if reader.pos != len(text):
        what = "after the tool calls" if calls else "after EOS"
        raise ChatParseError(reader.pos, f"unexpected text {what}: {reader.found()}; expected {EOS!r} and nothing more")
    return ParsedReply(reasoning=reasoning or None, content=content, tool_calls=calls, ended=ended)
