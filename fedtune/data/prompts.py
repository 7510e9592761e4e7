"""How a causal-LM prompt is shown to the model: ``chat``, ``alpaca`` or ``plain``.

``data.prompt_format`` is one of :data:`~fedtune.config.PROMPT_FORMATS`:

* ``chat``: the tokenizer's chat template, the prompt as the user's turn, followed by the
  start of the assistant's turn; the response ends with the template's end-of-turn
  (``<|im_end|>`` for SmolLM2-Instruct);
* ``alpaca``: ``### Instruction:`` (and ``### Input:``) then ``### Response:``; the
  response ends with the tokenizer's eos token;
* ``plain``: the prompt as it is; the response ends with the eos token;
* ``auto``: ``chat`` when the tokenizer has a chat template, else ``alpaca`` for Alpaca
  records (``data.alpaca: true``) and ``plain`` for other rows. Without a chat template
  this is exactly what fedtune did before prompt formats existed.

Training, evaluation and generation render prompts through :func:`render_prompt` and
end responses with :func:`response_suffix`, so the model sees one format everywhere.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedtune.errors import ConfigError
from fedtune.schema import PROMPT_FORMATS, FedtuneConfig

ALPACA_TEMPLATE = "### Instruction:\n{instruction}\n{input_block}\n### Response:\n"
# An Alpaca record's prompt is its instruction, then this and its input (when it has one).
INPUT_SEPARATOR = "\n\n"
CONCRETE_FORMATS = tuple(f for f in PROMPT_FORMATS if f != "auto")


def join_alpaca(instruction: str, input_text: str) -> str:
    """The prompt of an Alpaca record: the instruction, then a blank line and the input if any.

    Parameters
    ----------
    instruction, input_text : str
        The record's ``instruction`` and ``input`` fields, already stripped.

    Returns
    -------
    str
        ``instruction`` alone when ``input_text`` is empty, else
        ``instruction + "\\n\\n" + input_text``.
    """
    return f"{instruction}{INPUT_SEPARATOR}{input_text}" if input_text else instruction


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template (``tokenizer.chat_template`` is set)."""
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_prompt_format(tokenizer: Any, configured: str, *, alpaca: bool = False) -> str:
    """The concrete format that ``configured`` (a ``data.prompt_format`` value) means for ``tokenizer``.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        The tokenizer of the model being tuned (server and clients load the same one).
    configured : str
        One of :data:`~fedtune.config.PROMPT_FORMATS`.
    alpaca : bool, default False
        Whether the rows are Alpaca records (``data.alpaca``); decides ``auto`` for a
        tokenizer without a chat template.

    Returns
    -------
    str
        ``chat``, ``alpaca`` or ``plain``.

    Raises
    ------
    ConfigError
        For an unknown format, or ``chat`` with a tokenizer that has no chat template.
    """
    if configured not in PROMPT_FORMATS:
        raise ConfigError(f"data.prompt_format={configured!r} is not a prompt format; use one of {PROMPT_FORMATS}")
    if configured == "auto":
        if has_chat_template(tokenizer):
            return "chat"
        return "alpaca" if alpaca else "plain"
    if configured == "chat" and not has_chat_template(tokenizer):
        raise ConfigError(f"data.prompt_format='chat' but the tokenizer ({type(tokenizer).__name__}, "
                          f"{getattr(tokenizer, 'name_or_path', '?')}) has no chat template; use alpaca, plain "
                          "or auto, or a chat model")
    return configured


def _split_alpaca(prompt: str, alpaca_input: str | None) -> tuple[str, str]:
    if alpaca_input is None:
        instruction, _, input_text = prompt.partition(INPUT_SEPARATOR)
        return instruction, input_text
    if not alpaca_input:
        return prompt, ""
    tail = INPUT_SEPARATOR + alpaca_input
    if not prompt.endswith(tail):
        raise ValueError(f"alpaca_input={alpaca_input[:40]!r} is not the end of the prompt "
                         f"({prompt[-40:]!r}); the prompt of an Alpaca record is join_alpaca(instruction, input)")
    return prompt[: -len(tail)], alpaca_input


def render_prompt(tokenizer: Any, prompt: str, prompt_format: str, *, alpaca_input: str | None = None) -> str:
    """The text the model reads before its response, for ``prompt`` in ``prompt_format``.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Its chat template renders ``chat``; the other formats do not use it.
    prompt : str
        The prompt as loaded (an Alpaca record's is :func:`join_alpaca` of its fields).
    prompt_format : str
        ``chat``, ``alpaca`` or ``plain`` (resolve ``auto`` first with
        :func:`resolve_prompt_format`).
    alpaca_input : str or None, optional
        For ``alpaca`` only: the record's input, which ``prompt`` ends with (``""`` for
        none). When None, the text after the prompt's first blank line is taken as the
        input; that differs from the record only when its instruction itself holds a
        blank line.

    Returns
    -------
    str
        ``chat``: the chat template applied to one user turn with the assistant's turn
        opened (``add_generation_prompt=True``), special tokens included, so tokenize it
        with ``add_special_tokens=False``. ``alpaca``: :data:`ALPACA_TEMPLATE` filled in.
        ``plain``: ``prompt`` unchanged.
    """
    if prompt_format == "chat":
        if not has_chat_template(tokenizer):
            raise ValueError("prompt_format='chat' needs a tokenizer with a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if prompt_format == "alpaca":
        instruction, input_text = _split_alpaca(prompt, alpaca_input)
        block = f"\n### Input:\n{input_text}\n" if input_text else ""
        return ALPACA_TEMPLATE.format(instruction=instruction, input_block=block)
    if prompt_format == "plain":
        return prompt
    raise ValueError(f"prompt_format={prompt_format!r} is not one of {CONCRETE_FORMATS}; "
                     "resolve 'auto' with resolve_prompt_format first")


def response_suffix(tokenizer: Any, prompt_format: str) -> str:
    """What follows the response in training text: the end of the assistant's turn, or eos.

    For ``chat`` it is read off the template: a conversation with an assistant turn is
    rendered and what follows the assistant's text, without trailing whitespace, is the
    end-of-turn (``<|im_end|>`` for SmolLM2-Instruct). When the template writes nothing
    there, and for the other formats, it is the eos token (empty if there is none).
    """
    eos = tokenizer.eos_token or ""
    if prompt_format != "chat":
        return eos
    probe = "fedtune-response-probe"
    conversation = [{"role": "user", "content": "fedtune-prompt-probe"}, {"role": "assistant", "content": probe}]
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
    _, found, tail = rendered.partition(probe)
    end = tail.rstrip()
    return end if found and end else eos


def with_resolved_prompt_format(cfg: FedtuneConfig, tokenizer: Any | None = None) -> FedtuneConfig:
    """``cfg`` with ``data.prompt_format`` resolved, as a run records it (classification: unchanged).

    Parameters
    ----------
    cfg : FedtuneConfig
        A validated config.
    tokenizer : transformers tokenizer, optional
        The model's tokenizer; loaded from ``cfg.model`` when not given.
    """
    if cfg.model.task != "causal-lm":
        return cfg
    if tokenizer is None:
        from fedtune.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.model)
    resolved = resolve_prompt_format(tokenizer, cfg.data.prompt_format, alpaca=cfg.data.alpaca)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, prompt_format=resolved))


__all__ = [
    "ALPACA_TEMPLATE",
    "INPUT_SEPARATOR",
    "has_chat_template",
    "join_alpaca",
    "render_prompt",
    "resolve_prompt_format",
    "response_suffix",
    "with_resolved_prompt_format",
]
