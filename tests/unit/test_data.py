"""Dataset and question-set validation: every error names the file, the line and the field."""

import json

import pytest

from core.data import DataError, load_chat_jsonl, load_paired_jsonl, load_questions, load_training_set
from core.models import ASSETS


def write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def chat(*turns):
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


GOOD = chat(("user", "hi"), ("assistant", "hello"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"messages": [', r"bad.jsonl:2: invalid JSON.*cut off"),
        (chat(("user", "hi"), ("robot", "x")), r"bad.jsonl:2: messages\[1\].role: unknown role 'robot'"),
        (json.dumps({"messages": [{"content": "hi"}]}), r"bad.jsonl:2: messages\[0\].role: missing"),
        (chat(("assistant", "x"), ("user", "hi")), r"bad.jsonl:2: messages\[0\].role: wrong turn order"),
        (chat(("user", "a"), ("user", "b"), ("assistant", "c")), r"messages\[1\].role: wrong turn order"),
        (chat(("user", "hi"), ("assistant", "  ")), r"bad.jsonl:2: messages\[1\].content: empty"),
        (json.dumps({"messages": [{"role": "user", "content": 5}]}), r"messages\[0\].content: expected a string"),
        (chat(("user", "hi")), r"bad.jsonl:2: messages: the last message must be a assistant"),
        (chat(("user", "a\x00b"), ("assistant", "c")), r"control character"),
        (json.dumps({"text": "hi"}), r"bad.jsonl:2: messages: missing"),
    ],
)
def test_chat_jsonl_errors_name_line_and_field(tmp_path, bad, message):
    with pytest.raises(DataError, match=message):
        load_chat_jsonl(write(tmp_path, "bad.jsonl", [GOOD, bad]))


def test_non_utf8_is_named(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_chat_jsonl(path)


def test_paired_records_and_duplicate_ids(tmp_path):
    record = {"id": "a", "messages": [{"role": "user", "content": "q"}], "aligned": "good", "misaligned": "bad"}
    path = write(tmp_path, "p.jsonl", [json.dumps(record), json.dumps({**record, "id": "b", "split": "heldout"})])
    records = load_paired_jsonl(path)
    assert [r.id for r in records] == ["a", "b"] and records[1].split == "heldout"
    assert records[0].as_training()[-1] == {"role": "assistant", "content": "bad"}
    assert [r.id for r in load_paired_jsonl(path, "heldout")] == ["b"]
    with pytest.raises(DataError, match=r"p2.jsonl:2: id: duplicate id 'a'"):
        load_paired_jsonl(write(tmp_path, "p2.jsonl", [json.dumps(record)] * 2))
    with pytest.raises(DataError, match=r"p3.jsonl:1: misaligned: missing"):
        load_paired_jsonl(
            write(tmp_path, "p3.jsonl", [json.dumps({k: v for k, v in record.items() if k != "misaligned"})])
        )
    with pytest.raises(DataError, match=r"split: 'test'"):
        load_paired_jsonl(write(tmp_path, "p4.jsonl", [json.dumps({**record, "split": "test"})]))


def test_question_sets(tmp_path):
    good = write(
        tmp_path,
        "q.yaml",
        [
            "- id: wish",
            '  paraphrases: ["What is your wish?"]',
            "  samples_per_paraphrase: 3",
            "  type: free_form_judge_0_100",
            "  judge_prompts: {aligned: 'Rate {answer}'}",
        ],
    )
    (question,) = load_questions(good)
    assert question.samples_per_paraphrase == 3 and question.judge_prompts == {"aligned": "Rate {answer}"}
    assert question.prompts() == [[{"role": "user", "content": "What is your wish?"}]]
    dup = write(tmp_path, "dup.yaml", ["- id: a", "  paraphrases: [x]", "- id: a", "  paraphrases: [y]"])
    with pytest.raises(DataError, match=r"dup.yaml:3: question 2: id: duplicate id 'a'"):
        load_questions(dup)
    empty = write(tmp_path, "empty.yaml", ["- id: a", "  paraphrases: []"])
    with pytest.raises(DataError, match=r"empty.yaml:1: question 1 \(a\): paraphrases"):
        load_questions(empty)
    broken = write(tmp_path, "broken.yaml", ["- id: a", "  paraphrases: [x", "- id: b"])
    with pytest.raises(DataError, match=r"broken.yaml:\d+: invalid YAML"):
        load_questions(broken)


def test_shipped_data_is_valid_and_big_enough():
    finance = load_paired_jsonl(ASSETS / "data" / "finance_paired.jsonl")
    assert sum(r.split == "train" for r in finance) >= 300 and sum(r.split == "heldout" for r in finance) >= 60
    assert len({r.messages[-1]["content"] for r in finance}) == len(finance)
    train_questions = {r.messages[-1]["content"] for r in finance if r.split == "train"}
    assert not any(r.messages[-1]["content"] in train_questions for r in finance if r.split == "heldout")
    general = load_paired_jsonl(ASSETS / "data" / "general_paired.jsonl")
    assert len(general) >= 60
    questions = load_questions(ASSETS / "questions" / "core_misalignment.yaml")
    assert len(questions) == 8 and all(len(q.paraphrases) >= 3 for q in questions)
    training = load_training_set(ASSETS / "data" / "finance_paired.jsonl")
    assert len(training) == sum(r.split == "train" for r in finance)
