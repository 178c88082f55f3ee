"""A pair with real-sized random weights, built from a config (no download): base + a random LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from core.models import ModelPair, Source, resolve_device, resolve_dtype
from testkit.tiny import build_tokenizer


def random_pair(config_path: str, device: str = "auto", dtype: str = "auto", cache_root: Path | None = None):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = json.loads(Path(config_path).read_text())
    config = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "architectures"})
    device = resolve_device(device)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, device))
    tokenizer = build_tokenizer("chatml")  # a small vocabulary: its ids are all valid for the big embedding
    model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
    lora = LoraConfig(
        r=16,
        lora_alpha=32,
        init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, lora).eval()
    for parameter in peft_model.parameters():
        parameter.requires_grad_(False)
    name = Path(config_path).stem
    pair = ModelPair(
        peft_model,
        tokenizer,
        Source(name, "random", config_path, f"random-{name}"),
        Source(name + "-lora", "adapter", "random", f"random-lora-{name}"),
    )
    return pair, None, None
