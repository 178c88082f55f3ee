"""LoRA supervised fine-tuning on chat data: the way model organisms of EM are made.

Loss only on assistant tokens (answer plus end-of-turn marker), data rendered through the
model's own chat template and linted for other families' markers first. The run is
deterministic given the seed: the data order of each epoch comes from (seed, epoch), so a
run resumed from a checkpoint (adapter weights, optimiser, scheduler, RNG state) ends with
the same weights as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from core import __version__
from core.cache import atomic_write, sha256_bytes
from core.chat import encode_conversation, lint_dataset
from core.data import ChatRecord
from core.errors import InputError

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
IGNORE = -100


class TrainError(InputError):
    """Training cannot start or resume; the message names the problem."""


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 16
    lora_alpha: float = 32.0  # LoRA scaling numerator (not a steering α)
    rslora: bool = False
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ALL_PROJECTIONS
    layers_to_transform: tuple[int, ...] | None = None
    learning_rate: float = 2e-4
    epochs: int = 3
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 256
    seed: int = 0
    heldout_fraction: float = 0.1
    warmup_steps: int = 5
    checkpoint_every: int = 10
    save_dtype: str = "float32"  # the adapter file's dtype; float16 halves it at ~2e-4 relative rounding

    def __post_init__(self):
        for name in ("rank", "epochs", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name}: must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.heldout_fraction < 1:
            raise TrainError(f"heldout_fraction: must be in [0, 1), got {self.heldout_fraction}")
        if not 0 <= self.dropout < 1:
            raise TrainError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.save_dtype not in ("float32", "float16", "bfloat16"):
            raise TrainError(f"save_dtype: {self.save_dtype!r} is not float32, float16 or bfloat16")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainError(f"learning_rate: must be a positive number, got {self.learning_rate}")


@dataclass
class Example:
    ids: list[int]
    labels: list[int]


def build_examples(tokenizer, records: list[ChatRecord], max_length: int) -> tuple[list[Example], int]:
    """Token ids with labels on assistant turns only; returns the examples and how many were cut."""
    examples, truncated = [], 0
    for record in records:
        encoded = encode_conversation(tokenizer, record.messages)
        labels = [IGNORE] * len(encoded.ids)
        for start, end in encoded.turn_spans:
            labels[start:end] = encoded.ids[start:end]
        if len(encoded.ids) > max_length:
            truncated += 1
        ids, labels = encoded.ids[:max_length], labels[:max_length]
        if any(label != IGNORE for label in labels):
            examples.append(Example(ids, labels))
    return examples, truncated


def _split_examples(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = np.random.default_rng(seed).permutation(len(examples))
    n_eval = int(round(fraction * len(examples)))
    if fraction > 0 and len(examples) >= 10:
        n_eval = max(n_eval, 1)
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]]


def _collate(batch: list[Example], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for r, example in enumerate(batch):
        n = len(example.ids)
        ids[r, :n], labels[r, :n], attention[r, :n] = torch.tensor(example.ids), torch.tensor(example.labels), 1
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": attention.to(device)}


def _token_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled tokens, and their count.

    Logits are computed only where a label follows (``logits_to_keep`` as a boolean mask): the
    vocabulary projection of prompt positions would cost a fifth of the step for nothing.
    """
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = labelled
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets[labelled], reduction="sum"
    )
    return loss, int(labelled.sum())


def _evaluate_loss(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float | None:
    if not examples:
        return None
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            loss, n = _token_loss_sum(model, _collate(examples[start : start + batch_size], pad_id, device))
            total, count = total + float(loss), count + n
    model.train()
    return total / max(count, 1)


# ---------------------------------------------------------------- checkpoints


def _checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoint")


def _trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(out: Path, model, optimizer, scheduler, step: int, history: dict, fingerprint: str) -> None:
    from safetensors.torch import save_file

    target = _checkpoint_dir(out)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(_trainable_state(model), staging / "trainable.safetensors")
    torch.save(
        {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
        staging / "state.pt",
    )
    (staging / "progress.json").write_text(json.dumps({"step": step, "history": history, "run": fingerprint}))
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path, model, optimizer, scheduler, fingerprint: str) -> tuple[int, dict] | None:
    from safetensors.torch import load_file

    target = _checkpoint_dir(out)
    if not (target / "progress.json").exists():
        old = target.with_name(target.name + ".old")  # killed between the two renames
        if not (old / "progress.json").exists():
            return None
        target = old
    progress = json.loads((target / "progress.json").read_text())
    if progress["run"] != fingerprint:
        raise TrainError(
            f"{target}: the checkpoint belongs to a run with other data or settings; "
            "delete it or train without --resume"
        )
    state = load_file(target / "trainable.safetensors")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            parameters[name].copy_(value)
    # Our own file, holding only tensors and numbers: weights_only keeps unpickling safe.
    extra = torch.load(target / "state.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return progress["step"], progress["history"]


# ---------------------------------------------------------------- the run


@dataclass
class TrainResult:
    out: Path
    card: dict = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointEvent:
    """What an ``on_checkpoint`` callback of :func:`train` sees.

    ``step`` is the number of optimiser updates the weights have had: ``start_step`` when the run
    begins (0 for a fresh run, the restored step for a resumed one), then every saved checkpoint,
    the last one being ``total_steps``. ``model`` is the PEFT model being trained, in eval mode for
    the call; a callback reads it and must leave its weights as they were."""

    step: int
    total_steps: int
    model: torch.nn.Module
    tokenizer: object
    base_source: object  # core.models.Source of the base weights
    run: str  # the run's fingerprint (config, data, base): equal for a run and its resumption
    starting: bool  # the call made when the run (re)starts, before any further update


def _call_at_checkpoint(callback, model, **fields) -> None:
    """Run ``callback`` with the model in eval mode and the RNG state untouched, so the training that
    follows is bit-for-bit the same with or without it (and a resumed run with or without it)."""
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    model.eval()
    try:
        callback(CheckpointEvent(model=model, **fields))
    finally:
        model.train()
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def train(
    base: str,
    records: list[ChatRecord],
    config: TrainConfig,
    out: Path | str,
    *,
    dataset_hash: str,
    options=None,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    on_checkpoint: Callable[[CheckpointEvent], None] | None = None,
) -> TrainResult:
    """Fine-tune a LoRA adapter on ``records``; write it and its training card to ``out``.

    ``on_checkpoint`` (e.g. :class:`core.monitor.Monitor`) is called once when the run starts or
    resumes, before any further update, and after every saved checkpoint (see :class:`CheckpointEvent`)."""
    from peft import LoraConfig, get_peft_model

    from core.models import LoadOptions, load_base

    out = Path(out)
    options = options or LoadOptions()
    model, tokenizer, source = load_base(base, options)
    issues = lint_dataset(tokenizer, [(r.line, r.messages) for r in records])
    if issues and not force:
        listing = "\n  ".join(str(i) for i in issues[:8])
        more = f"\n  ... and {len(issues) - 8} more" if len(issues) > 8 else ""
        raise TrainError(
            f"the data does not fit this model's chat template ({len(issues)} problems):\n  "
            f"{listing}{more}\nfix the data, or pass --force to train anyway"
        )
    if config.layers_to_transform and max(config.layers_to_transform) >= model.config.num_hidden_layers:
        raise TrainError(
            f"layers_to_transform: layer {max(config.layers_to_transform)} is out of range; "
            f"the model has layers 0..{model.config.num_hidden_layers - 1}"
        )
    examples, truncated = build_examples(tokenizer, records, config.max_length)
    if not examples:
        raise TrainError("no training example has assistant tokens within max_length")
    train_set, eval_set = _split_examples(examples, config.heldout_fraction, config.seed)

    torch.manual_seed(config.seed)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        use_rslora=config.rslora,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        layers_to_transform=list(config.layers_to_transform) if config.layers_to_transform else None,
    )
    try:
        model = get_peft_model(model, lora)
    except ValueError as err:
        raise TrainError(f"target_modules {list(config.target_modules)}: {err}") from err
    model.train()
    device = next(model.parameters()).device
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
    per_epoch = math.ceil(len(train_set) / (config.batch_size * config.grad_accum))
    total_steps = per_epoch * config.epochs

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to zero
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - config.warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(enabled=next(model.parameters()).dtype == torch.float16)

    run_fingerprint = sha256_bytes(
        json.dumps([asdict(config), dataset_hash, source.fingerprint, len(examples)], default=str).encode()
    )[:16]
    history: dict = {"loss": [], "eval": []}
    start_step = 0
    if resume:
        restored = load_checkpoint(out, model, optimizer, scheduler, run_fingerprint)
        if restored:
            start_step, history = restored
    pad_id = tokenizer.pad_token_id
    started = time.time()
    micro = config.batch_size
    at_checkpoint = dict(total_steps=total_steps, tokenizer=tokenizer, base_source=source, run=run_fingerprint)
    if on_checkpoint:
        _call_at_checkpoint(on_checkpoint, model, step=start_step, starting=True, **at_checkpoint)
    for step in range(start_step, total_steps):
        epoch, position = divmod(step, per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed * 1000 + epoch))
        chunk = order[position * micro * config.grad_accum : (position + 1) * micro * config.grad_accum].tolist()
        batches = [
            _collate([train_set[i] for i in chunk[k : k + micro]], pad_id, device) for k in range(0, len(chunk), micro)
        ]
        n_tokens = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            loss, _ = _token_loss_sum(model, batch)
            scaler.scale(loss / n_tokens).backward()
            total += float(loss.detach())
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        history["loss"].append([step + 1, total / n_tokens])
        if progress:
            progress(step + 1, total_steps, total / n_tokens)
        if (step + 1) % per_epoch == 0:
            history["eval"].append([epoch + 1, step + 1, _evaluate_loss(model, eval_set, micro, pad_id, device)])
        if (step + 1) % config.checkpoint_every == 0 or (step + 1) % per_epoch == 0:
            save_checkpoint(out, model, optimizer, scheduler, step + 1, history, run_fingerprint)
            if on_checkpoint:
                _call_at_checkpoint(on_checkpoint, model, step=step + 1, starting=False, **at_checkpoint)

    import peft
    import transformers

    card = {
        "base": base,
        "base_fingerprint": source.fingerprint,
        "dataset_sha256": dataset_hash,
        "n_examples": len(examples),
        "n_train": len(train_set),
        "n_eval": len(eval_set),
        "truncated": truncated,
        "config": asdict(config),
        "steps": total_steps,
        "loss_curve": history["loss"],
        "eval_loss": history["eval"],
        "lint": "clean" if not issues else f"forced past {len(issues)} template problems",
        "resumed_from_step": start_step or None,
        "seconds_this_session": round(time.time() - started, 1),
        "code_version": __version__,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }
    from core.models import DEFAULT, DEFAULT_BASE_ID

    # Record what the adapter was trained on, not this machine's path to it.
    model.peft_config["default"].base_model_name_or_path = DEFAULT_BASE_ID if base == DEFAULT else base
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, save_embedding_layers=False)  # "auto" would query the hub
    if config.save_dtype != "float32":
        from safetensors.torch import load_file, save_file

        weights = staging / "adapter_model.safetensors"
        dtype = getattr(torch, config.save_dtype)
        save_file({k: v.to(dtype) for k, v in load_file(weights).items()}, weights, metadata={"format": "pt"})
    (staging / "README.md").unlink(missing_ok=True)  # peft's blank model-card template; the card below says it all
    atomic_write(staging / "training_card.json", json.dumps(card, indent=2).encode())
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    shutil.rmtree(_checkpoint_dir(out), ignore_errors=True)
    return TrainResult(out, card)
