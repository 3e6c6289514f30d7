"""A Hugging Face tokenizer folder for an exported model: our `tokenizers` Tokenizer plus the V4 chat template, so
that `AutoTokenizer.from_pretrained(folder).apply_chat_template(...)` writes exactly what `chat.render` writes.

The folder holds `tokenizer.json` (the Tokenizer as it is) and `tokenizer_config.json` (class
PreTrainedTokenizerFast, BOS/EOS, EOS as the pad token as in V4, the chat template, `model_max_length` when known).
transformers needs nothing else to load it offline; `special_tokens_map.json` is not written, as transformers reads
the special tokens from `tokenizer_config.json`.

The three modes of `chat.render` map onto `apply_chat_template` keywords as in DeepSeek-V3.1's template and vLLM's
DeepSeek encoders (the template's header comment has the details):

    chat       apply_chat_template(messages, tools=..., add_generation_prompt=...)
    think      apply_chat_template(messages, ..., thinking=True)           (enable_thinking=True works too)
    think_max  apply_chat_template(messages, ..., thinking=True, reasoning_effort="max")

Messages are OpenAI dicts (`Conversation.to_dict()` gives them) except that tool-call `arguments` must be a mapping:
a Jinja template cannot parse the JSON string OpenAI sends (`template_inputs` converts). transformers'
`add_generation_prompt` defaults to False where `chat.render`'s defaults to True; pass it.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from dsv4train.config.errors import ConfigError
from dsv4train.data.chat import BOS, EOS, Conversation
from dsv4train.data.tokenizer import TOKENIZER_JSON, missing_chat_tokens

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template() -> str:
    """The Jinja chat template shipped with the package (dsv4train/data/chat_template.jinja)."""
    try:
        return resources.files("dsv4train.data").joinpath(CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"dsv4train/data/{CHAT_TEMPLATE_FILE} is not installed with the package: pyproject.toml's "
            f'[tool.setuptools.package-data] must list "data/{CHAT_TEMPLATE_FILE}"; reinstall after adding it'
        ) from None


def template_inputs(conversation: Conversation) -> dict[str, Any]:
    """`{"messages": [...], "tools": [...] or None}` for `apply_chat_template(**...)`: `Conversation.to_dict()` with
    each tool call's JSON-string arguments turned back into the mapping a template can iterate."""
    record = conversation.to_dict()
    for message in record["messages"]:
        for call in message.get("tool_calls", ()):
            call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    return {"messages": record["messages"], "tools": record.get("tools")}


def tokenizer_config(model_max_length: int | None, with_chat_template: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,  # V4 pads with EOS (arch ref §9.4)
        "clean_up_tokenization_spaces": False,  # byte-level BPE decodes spaces exactly; the clean-up would drop some
    }
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    if with_chat_template:
        config["chat_template"] = chat_template()
    return config


def write_hf_tokenizer(
    tok: Tokenizer, folder: str | Path, model_max_length: int | None = None, with_chat_template: bool = True
) -> list[Path]:
    """Write `tok` as a transformers tokenizer folder into `folder` (created if needed; other files are left alone,
    so it can be a model export's folder). Returns the files written.

    `with_chat_template` needs every chat special string as a whole token (`missing_chat_tokens`); a ConfigError
    names the missing ones otherwise. BOS and EOS are needed either way."""
    if tok.token_to_id(BOS) is None or tok.token_to_id(EOS) is None:
        raise ConfigError(f"the tokenizer has no {BOS!r} or no {EOS!r} token; an HF export needs both as BOS and EOS")
    missing = missing_chat_tokens(tok) if with_chat_template else []
    if missing:
        raise ConfigError(
            f"the tokenizer does not keep {missing} as single tokens, so the chat template would render them as "
            "pieces the model never saw; write it without the chat template or use a tokenizer that has them"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_JSON))
    config = tokenizer_config(model_max_length, with_chat_template)
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [folder / TOKENIZER_JSON, folder / TOKENIZER_CONFIG]
