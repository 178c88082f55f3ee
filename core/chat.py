"""Rendering through the tokenizer's own chat template, and the token spans of answers.

Every prompt the tool feeds a model goes through ``apply_chat_template`` of that model's
tokenizer, default system prompt kept. Answer spans are found by rendering the
conversation up to each assistant turn with the generation prompt (the assistant
header) and mapping character offsets to tokens, so they are right for any template
that renders conversations as prefixes of each other (ChatML, Llama-3, Gemma, ...).
"""

from __future__ import annotations

from dataclasses import dataclass

from core.errors import InputError

ROLES = ("system", "user", "assistant")
Messages = list[dict[str, str]]


class ChatError(InputError):
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
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            raise ChatError(f"{where}[{i}].content: not valid UTF-8 (undecodable bytes in the input)") from None
        # A model's own answer may hold any character; typed prompts and system messages may not.
        control = next((c for c in content if ord(c) < 32 and c not in "\n\t\r"), None)
        if control is not None and role != "assistant":
            raise ChatError(f"{where}[{i}].content: contains control character {control!r}")


def render(tokenizer, messages: Messages, add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
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


# ---------------------------------------------------------------- template lint

# Turn markers of the common chat-template families. Text of another family inside data
# for this model means the data was rendered for a different model: it trains, the loss
# falls, and the effect is quietly weakened.
FAMILY_MARKERS = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|begin_of_text|>"),
    "llama2/mistral": ("[INST]", "[/INST]", "<<SYS>>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
}


@dataclass(frozen=True)
class LintIssue:
    record: int  # 1-based line of the record in its file (0: the template itself)
    where: str  # e.g. "messages[1].content"
    problem: str

    def __str__(self) -> str:
        place = f"line {self.record}: {self.where}" if self.record else self.where
        return f"{place}: {self.problem}"


def _template_family(tokenizer) -> str | None:
    """The family whose markers the model's own template writes."""
    sample = render(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], False)
    for family, markers in FAMILY_MARKERS.items():
        if any(marker in sample for marker in markers):
            return family
    return None


def lint_template(tokenizer) -> list[LintIssue]:
    """The generation header must be written exactly once, after the last user turn."""
    messages = [{"role": "user", "content": "x"}]
    with_header = render(tokenizer, messages, add_generation_prompt=True)
    without = render(tokenizer, messages, add_generation_prompt=False)
    if with_header == without:
        return [LintIssue(0, "chat template", "writes no generation header (add_generation_prompt has no effect)")]
    header = with_header[len(without) :] if with_header.startswith(without) else None
    if header and with_header.count(header.strip()) > 1 + without.count(header.strip()):
        return [LintIssue(0, "chat template", f"writes the generation header {header!r} twice")]
    return []


def lint_conversation(
    tokenizer, messages: Messages, record: int, family: str | None = None, header: str | None = None
) -> list[LintIssue]:
    family = family if family is not None else _template_family(tokenizer)
    issues = []
    own = set(FAMILY_MARKERS.get(family, ())) | set(getattr(tokenizer, "all_special_tokens", []))
    for i, message in enumerate(messages):
        content, where = message["content"], f"messages[{i}].content"
        for other, markers in FAMILY_MARKERS.items():
            if other == family:
                continue
            found = [m for m in markers if m in content]
            if found:
                issues.append(
                    LintIssue(
                        record,
                        where,
                        f"contains {found[0]!r}, a turn marker of the {other} "
                        f"template family (this model uses {family or 'another'})",
                    )
                )
        rendered_inside = [t for t in own if t and len(t) > 2 and t in content]
        if rendered_inside:
            issues.append(
                LintIssue(
                    record,
                    where,
                    f"contains {rendered_inside[0]!r}: pre-rendered template text "
                    "inside a message (give plain text; the template adds markers)",
                )
            )
        if header and message["role"] == "assistant" and content.lstrip().startswith(header.strip()):
            issues.append(
                LintIssue(
                    record,
                    where,
                    f"starts with the generation header {header.strip()!r}, "
                    "which the template already writes: it would be doubled",
                )
            )
    return issues


def _generation_header(tokenizer) -> str | None:
    messages = [{"role": "user", "content": "x"}]
    with_header = render(tokenizer, messages, add_generation_prompt=True)
    without = render(tokenizer, messages, add_generation_prompt=False)
    return with_header[len(without) :] if with_header.startswith(without) and with_header != without else None


def lint_dataset(tokenizer, records: list[tuple[int, Messages]]) -> list[LintIssue]:
    """Lint every record (``(line, messages)``) of a dataset for this tokenizer's template."""
    family, header = _template_family(tokenizer), _generation_header(tokenizer)
    issues = lint_template(tokenizer)
    for line, messages in records:
        issues.extend(lint_conversation(tokenizer, messages, line, family, header))
    return issues
