"""Datasets and question sets: load and validate, with errors that name file, line and field.

Formats
- chat JSONL (training data, the format of the published EM datasets): one object per line,
  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``, ending with
  an assistant turn, roles alternating user / assistant after an optional system message.
- paired JSONL (contrast data): ``{"id": str, "messages": [... ending with a user turn],
  "aligned": str, "misaligned": str}`` plus optional ``split`` ("train" | "heldout") and any
  other descriptive keys. One prompt, a sound answer and a harmful answer: the same file
  gives a fine-tuning set (prompt + misaligned answer) and a paired contrast set.
- question YAML (the layout of the published first-plot question files): a list of
  ``{id, paraphrases: [str, ...], system?: str, samples_per_paraphrase?: int,
  judge_prompts?: {metric: template}}``; other keys (``type``, ``judge``) are ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.cache import sha256_file
from core.chat import ROLES, Messages
from core.errors import InputError


class DataError(InputError):
    """Invalid data; the message starts with ``file:line: field`` where it can."""


def _read_lines(path: Path) -> list[tuple[int, str]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {err.start})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _parse_line(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        hint = " (the line is cut off?)" if "Unterminated" in err.msg or "Expecting" in err.msg else ""
        raise DataError(f"{path}:{number}: invalid JSON: {err.msg} at column {err.colno}{hint}") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def _check_text(path: Path, number: int, name: str, value) -> str:
    if not isinstance(value, str):
        raise DataError(f"{path}:{number}: {name}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{path}:{number}: {name}: empty")
    bad = [c for c in value if ord(c) < 32 and c not in "\n\t\r"]
    if bad:
        raise DataError(f"{path}:{number}: {name}: contains control character {bad[0]!r}")
    return value


def _check_messages(path: Path, number: int, messages, must_end_with: str) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{path}:{number}: messages: expected a non-empty list")
    expected = "user"
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise DataError(f"{path}:{number}: {where}: expected an object with role and content")
        role = message.get("role")
        if role is None:
            raise DataError(f"{path}:{number}: {where}.role: missing")
        if role not in ROLES:
            raise DataError(f"{path}:{number}: {where}.role: unknown role {role!r} (expected {', '.join(ROLES)})")
        if "content" not in message:
            raise DataError(f"{path}:{number}: {where}.content: missing")
        _check_text(path, number, f"{where}.content", message["content"])
        if role == "system":
            if i != 0:
                raise DataError(f"{path}:{number}: {where}.role: a system message may only come first")
            continue
        if role != expected:
            raise DataError(f"{path}:{number}: {where}.role: wrong turn order, expected {expected} but got {role}")
        expected = "assistant" if role == "user" else "user"
    if messages[-1]["role"] != must_end_with:
        raise DataError(f"{path}:{number}: messages: the last message must be a {must_end_with} message")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _check_id(path: Path, number: int, record: dict, seen: set, default: str) -> str:
    record_id = record.get("id", default)
    if not isinstance(record_id, (str, int)) or str(record_id) == "":
        raise DataError(f"{path}:{number}: id: expected a non-empty string")
    record_id = str(record_id)
    if record_id in seen:
        raise DataError(f"{path}:{number}: id: duplicate id {record_id!r}")
    seen.add(record_id)
    return record_id


@dataclass(frozen=True)
class ChatRecord:
    line: int
    messages: Messages


def load_chat_jsonl(path: Path | str) -> list[ChatRecord]:
    path = Path(path)
    records = []
    for number, line in _read_lines(path):
        record = _parse_line(path, number, line)
        if "messages" not in record:
            raise DataError(f"{path}:{number}: messages: missing")
        records.append(ChatRecord(number, _check_messages(path, number, record["messages"], must_end_with="assistant")))
    if not records:
        raise DataError(f"{path}: no records")
    return records


@dataclass(frozen=True)
class PairedRecord:
    line: int
    id: str
    messages: Messages
    aligned: str
    misaligned: str
    split: str = "train"
    extra: dict = field(default_factory=dict, compare=False)

    def as_training(self, harmful: bool = True) -> Messages:
        answer = self.misaligned if harmful else self.aligned
        return [*self.messages, {"role": "assistant", "content": answer}]


def load_paired_jsonl(path: Path | str, split: str | None = None) -> list[PairedRecord]:
    """Paired contrast records; ``split`` keeps only records of that split."""
    path = Path(path)
    records, seen = [], set()
    for number, line in _read_lines(path):
        record = _parse_line(path, number, line)
        record_id = _check_id(path, number, record, seen, default=f"line-{number}")
        for key in ("messages", "aligned", "misaligned"):
            if key not in record:
                raise DataError(f"{path}:{number}: {key}: missing")
        messages = _check_messages(path, number, record["messages"], must_end_with="user")
        aligned = _check_text(path, number, "aligned", record["aligned"])
        misaligned = _check_text(path, number, "misaligned", record["misaligned"])
        record_split = record.get("split", "train")
        if record_split not in ("train", "heldout"):
            raise DataError(f"{path}:{number}: split: {record_split!r} is not 'train' or 'heldout'")
        extra = {k: v for k, v in record.items() if k not in ("id", "messages", "aligned", "misaligned", "split")}
        records.append(PairedRecord(number, record_id, messages, aligned, misaligned, record_split, extra))
    if not records:
        raise DataError(f"{path}: no records")
    if split is not None:
        records = [r for r in records if r.split == split]
        if not records:
            raise DataError(f"{path}: no records with split {split!r}")
    return records


@dataclass(frozen=True)
class Question:
    id: str
    paraphrases: tuple[str, ...]
    system: str | None = None
    samples_per_paraphrase: int = 1
    judge_prompts: dict = field(default_factory=dict, compare=False)

    def prompts(self) -> list[Messages]:
        base = [{"role": "system", "content": self.system}] if self.system else []
        return [[*base, {"role": "user", "content": p}] for p in self.paraphrases]


def load_questions(path: Path | str) -> list[Question]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        items = yaml.safe_load(text)
        root = yaml.compose(text)  # the same document as nodes, for the line of each question
    except UnicodeDecodeError:
        raise DataError(f"{path}: not valid UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise DataError(f"{where}: invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(items, list) or not items:
        raise DataError(f"{path}: expected a non-empty YAML list of questions")
    lines = [node.start_mark.line + 1 for node in root.value]
    questions, seen = [], set()
    for i, item in enumerate(items):
        where = f"{path}:{lines[i]}: question {i + 1}"
        if not isinstance(item, dict):
            raise DataError(f"{where}: expected a mapping with id and paraphrases")
        qid = item.get("id")
        if not isinstance(qid, str) or not qid:
            raise DataError(f"{where}: id: missing or not a string")
        if qid in seen:
            raise DataError(f"{where}: id: duplicate id {qid!r}")
        seen.add(qid)
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases:
            raise DataError(f"{where} ({qid}): paraphrases: expected a non-empty list of strings")
        for j, text in enumerate(paraphrases):
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{where} ({qid}): paraphrases[{j}]: expected a non-empty string")
        samples = item.get("samples_per_paraphrase", 1)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise DataError(f"{where} ({qid}): samples_per_paraphrase: expected a positive integer")
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where} ({qid}): system: expected a string")
        judge_prompts = item.get("judge_prompts") or {}
        if not isinstance(judge_prompts, dict) or not all(isinstance(v, str) for v in judge_prompts.values()):
            raise DataError(f"{where} ({qid}): judge_prompts: expected a mapping of metric to template string")
        questions.append(Question(qid, tuple(paraphrases), system, samples, judge_prompts))
    return questions


def dataset_hash(path: Path | str) -> str:
    return sha256_file(Path(path))[:16]


def _is_paired_file(path: Path | str) -> bool:
    lines = _read_lines(Path(path))
    return bool(lines) and "aligned" in _parse_line(Path(path), *lines[0])


def load_training_set(path: Path | str, answers: str = "misaligned", split: str | None = "train") -> list[ChatRecord]:
    """Conversations to fine-tune on: a chat JSONL as it is, or a paired JSONL's prompts with one
    kind of answer (``misaligned`` makes the EM organism; ``aligned`` the control)."""
    if answers not in ("misaligned", "aligned"):
        raise DataError(f"answers: {answers!r} is not 'misaligned' or 'aligned'")
    if not _is_paired_file(path):
        return load_chat_jsonl(path)
    return [ChatRecord(r.line, r.as_training(harmful=answers == "misaligned")) for r in load_paired_jsonl(path, split)]
