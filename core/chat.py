"""Rendering through the tokenizer's own chat template, and the token spans of answers.

Every prompt the tool feeds a model goes through ``apply_chat_template`` of that model's
tokenizer, default system prompt kept. Answer spans are found by rendering the
conversation up to each assistant turn with the generation prompt (the assistant
header) and mapping character offsets to tokens, so they are right for any template
that renders conversations as prefixes of each other (ChatML, Llama-3, Gemma, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class ChatError(ValueError):
    """A conversation or prompt that cannot be rendered; the message names the problem."""


def user_prompt(text: str, system: str | None = None) -> Messages:
    """The messages for a single user turn, with an optional system prompt."""
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]


def validate_messages(messages: Messages, where: str = "messages") -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatError(f"{where}: expected a non-empty list of messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatError(f"{where}[{i}]: expected an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ChatError(f"{where}[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatError(f"{where}[{i}].content: expected a string, got {type(content).__name__}")
        if not content.strip():
            raise ChatError(f"{where}[{i}].content: empty {role} message")


def render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja raise_exception, missing template, ...
        raise ChatError(f"the model's chat template cannot render this conversation: {err}") from err


def render_prompt(tokenizer, messages: Messages) -> str:
    """The prompt exactly as the model sees it before answering (generation header included)."""
    validate_messages(messages, "prompt")
    if messages[-1]["role"] == "assistant":
        raise ChatError("prompt: the last message must not be an assistant message")
    return render(tokenizer, messages, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: Messages) -> list[int]:
    # The template already writes BOS and turn markers: adding special tokens would double them.
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class Encoded:
    """A teacher-forced conversation: token ids and, per assistant turn, two token spans.

    ``answer_spans`` cover the answer text itself (what directions average over);
    ``turn_spans`` add the end-of-turn marker (what training puts its loss on).
    Spans are half-open ``(start, end)`` token indices.
    """

    ids: list[int]
    answer_spans: list[tuple[int, int]]
    turn_spans: list[tuple[int, int]]


def _char_span_to_tokens(offsets: list[tuple[int, int]], start: int, end: int) -> tuple[int, int]:
    inside = [i for i, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
    if not inside:
        raise ChatError("an assistant answer maps to no tokens")
    return inside[0], inside[-1] + 1


def encode_conversation(tokenizer, messages: Messages) -> Encoded:
    """Tokenise a conversation with at least one assistant turn and locate its answers."""
    validate_messages(messages, "conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatError("conversation: no assistant message to locate")
    full = render(tokenizer, messages, add_generation_prompt=False)
    char_answers, char_turns = [], []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
        upto = render(tokenizer, messages[: k + 1], add_generation_prompt=False)
        if not (upto.startswith(prefix) and full.startswith(upto)):
            raise ChatError(
                f"conversation: the chat template does not render turn {k} as a prefix of the whole "
                "conversation, so the answer span cannot be located"
            )
        turn_end = len(upto.rstrip())
        content = message["content"].strip()
        found = upto.find(content, len(prefix))
        answer = (found, found + len(content)) if found >= 0 else (len(prefix), turn_end)
        char_answers.append(answer)
        char_turns.append((len(prefix), turn_end))
    encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [tuple(o) for o in encoding["offset_mapping"]]
    return Encoded(
        ids=list(encoding["input_ids"]),
        answer_spans=[_char_span_to_tokens(offsets, a, b) for a, b in char_answers],
        turn_spans=[_char_span_to_tokens(offsets, a, b) for a, b in char_turns],
    )


def prompt_and_answer(messages: Messages, answer: str) -> Messages:
    return [*messages, {"role": "assistant", "content": answer}]
