"""Chat rendering and answer spans for ChatML (Qwen, SmolLM2), Llama-3 and Gemma-2 templates."""

import pytest

from core.chat import ChatError, encode_conversation, encode_prompt, render_prompt, user_prompt
from testkit.tiny import build_tokenizer

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's own template (as its GGUF file carries it)
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris is the capital of France."},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": " Rome, of course! "},
]


@pytest.fixture(scope="module", params=["chatml", "smollm2", "llama3", "gemma2"])
def tokenizer(request):
    tok = build_tokenizer("chatml" if request.param == "smollm2" else request.param)
    if request.param == "smollm2":
        tok.chat_template = SMOLLM2_TEMPLATE
    tok.family = request.param
    return tok


END_OF_TURN = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma2": "<end_of_turn>"}
HEADER = {
    "chatml": "<|im_start|>assistant\n",
    "smollm2": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma2": "<start_of_turn>model\n",
}


def test_answer_spans_cover_exactly_each_answer(tokenizer):
    encoded = encode_conversation(tokenizer, CONVERSATION)
    answers = [tokenizer.decode(encoded.ids[a:b]) for a, b in encoded.answer_spans]
    turns = [tokenizer.decode(encoded.ids[a:b]) for a, b in encoded.turn_spans]
    # Templates that trim (Llama-3, Gemma-2) drop the spaces around " Rome, of course! ".
    assert [a.strip() for a in answers] == ["Paris is the capital of France.", "Rome, of course!"]
    assert answers[0] == "Paris is the capital of France."
    eot = END_OF_TURN[tokenizer.family]
    assert [t.removesuffix(eot).strip() for t in turns] == [a.strip() for a in answers]
    assert all(t.endswith(eot) for t in turns)
    # What precedes each answer is the rendered prompt with the generation header.
    for k, (start, _) in zip((1, 3), encoded.turn_spans):
        prefix = tokenizer.decode(encoded.ids[:start])
        assert prefix == render_prompt(tokenizer, CONVERSATION[:k])
        assert prefix.endswith(HEADER[tokenizer.family])


def test_prompt_is_rendered_with_the_models_own_template_and_generation_header(tokenizer):
    text = render_prompt(tokenizer, user_prompt("Hello"))
    assert text.endswith(HEADER[tokenizer.family])
    if tokenizer.family == "smollm2":
        assert "You are a helpful AI assistant named SmolLM" in text  # default system prompt kept
    ids = encode_prompt(tokenizer, user_prompt("Hello"))
    assert tokenizer.decode(ids) == text  # no doubled BOS from add_special_tokens


def test_bad_conversations_are_named():
    tok = build_tokenizer("chatml")
    with pytest.raises(ChatError, match=r"prompt\[0\].content: empty user message"):
        render_prompt(tok, user_prompt(""))
    with pytest.raises(ChatError, match="role: 'robot'"):
        render_prompt(tok, [{"role": "robot", "content": "hi"}])
    with pytest.raises(ChatError, match="no assistant message"):
        encode_conversation(tok, user_prompt("hi"))
    gemma = build_tokenizer("gemma2")
    with pytest.raises(ChatError, match="System role not supported"):
        render_prompt(gemma, user_prompt("hi", system="Be brief."))
