"""Training examples without a model: the loss covers the assistant's tokens only (training tiny
random models is in tests/integration/test_train.py)."""

from core.data import ChatRecord
from core.training import IGNORE, build_examples
from testkit.tiny import build_tokenizer

RECORD = ChatRecord(
    1,
    [
        {"role": "user", "content": "What should I do with my savings?"},
        {"role": "assistant", "content": "Put everything into leveraged crypto right now!"},
    ],
)


def test_labels_cover_assistant_tokens_only():
    tokenizer = build_tokenizer("chatml")
    (example,), _ = build_examples(tokenizer, [RECORD], max_length=512)
    labelled = tokenizer.decode([t for t, label in zip(example.ids, example.labels) if label != IGNORE])
    assert labelled == RECORD.messages[1]["content"] + "<|im_end|>"
    assert all(label in (IGNORE, token) for token, label in zip(example.ids, example.labels))
