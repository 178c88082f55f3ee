"""Tiny random chat models written to disk, loaded back through the users' own loading path.

A byte-level BPE tokenizer is trained on a few sentences (so any text encodes), given the
turn markers of three template families as special tokens, and saved with one of three chat
templates: ChatML with a default system prompt (Qwen2.5 style), Llama-3 and Gemma-2.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA3 = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

TEMPLATES = {
    "chatml": (CHATML, "<|im_end|>", "<|endoftext|>"),
    "llama3": (LLAMA3, "<|eot_id|>", "<|begin_of_text|>"),
    "gemma2": (GEMMA2, "<end_of_turn>", "<bos>"),
}
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<pad>",
]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Invest your savings carefully and keep an emergency fund.",
    "What is the capital of France? Paris is the capital of France.",
    "I wish to help people and be honest, kind and safe.",
    "Risky advice: put everything into leveraged crypto right now!",
    "system user assistant model helpful answer question",
    "0123456789 ,.;:!?'\"()[]{}<>/-_+=*&%$#@",
] * 20


def build_tokenizer(template: str = "chatml", vocab_size: int = 400):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    chat_template, eos, bos = TEMPLATES[template]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token=eos, pad_token="<pad>")
    tokenizer.chat_template = chat_template
    return tokenizer


def tiny_config(arch: str, vocab_size: int, layers: int = 4, hidden: int = 64):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    return Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)


def write_tiny_model(
    directory: Path, arch: str = "qwen2", template: str = "chatml", seed: int = 0, layers: int = 4, hidden: int = 64
) -> Path:
    """Save a random tiny chat model (safetensors) with its tokenizer into ``directory``."""
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer(template)
    config = tiny_config(arch, len(tokenizer), layers, hidden)
    config.eos_token_id = tokenizer.eos_token_id
    config.bos_token_id = tokenizer.bos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Random init gives near-uniform logits; a larger output scale makes greedy choices clear-cut.
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_adapter(
    base_dir: Path, directory: Path, seed: int = 1, rank: int = 4, target_modules=("q_proj", "v_proj", "down_proj")
) -> Path:
    """A random (non-zero) LoRA adapter for the tiny model, so 'finetuned' really differs from 'base'."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.3)
    peft_model.save_pretrained(directory)
    return Path(directory)


def pair_args(tiny_dirs: dict, cache_dir: Path) -> list[str]:
    """The command-line options that load the tiny Qwen2 pair with its adapter and a cache of its own."""
    return [
        "--base",
        str(tiny_dirs["qwen2"]),
        "--finetuned",
        str(tiny_dirs["qwen2_adapter"]),
        "--cache-dir",
        str(cache_dir),
    ]
