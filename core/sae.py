"""Sparse-autoencoder latents of a direction: which interpretable features it is made of.

Given a sparse autoencoder (SAE) trained on one layer's residual stream, two readings name latents by
their index, which is what SAE viewers (Neuronpedia) look them up by:

- **decoder cosine**: the latents whose decoder vector (a row of ``W_dec``) points most along, and most
  against, the direction at the SAE's layer;
- **activation contrast**: the latents whose mean activation over answer tokens (token-weighted, pooled
  over the answers, as the direction itself is) differs most between the misaligned and the aligned
  answers, teacher-forced through one side of the pair (the fine-tune by default, as in extraction).

**Where an SAE comes from.** A local directory in sae-lens' format — ``cfg.json`` (``d_in``, ``d_sae``,
``architecture``, ``apply_b_dec_to_input``, ``normalize_activations``; the hook under
``metadata.hook_name`` since sae-lens 6, top-level ``hook_name`` / ``hook_point`` before) and
``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``,
``b_dec [d_in]``, and ``threshold [d_sae]`` for JumpReLU) — is read here directly: json and safetensors,
every field checked with an error naming it (sae-lens itself takes tens of seconds to import). An sae-lens
*release* (``gemma-scope-2b-pt-res-canonical`` with an SAE id such as ``layer_12/width_16k/canonical``;
needs hub access) is loaded through sae-lens' own loaders, which convert the published formats, into the
same :class:`SparseAutoencoder`. Architectures: standard (ReLU), JumpReLU, TopK; inputs not normalised.

**Layer.** The SAE's hook must be a block output in EM Lens' convention: ``blocks.{i}.hook_resid_post`` is
layer i, and so is ``blocks.{i+1}.hook_resid_pre`` (the same tensor) and a Hugging Face hook on
``model.layers.{i}``. Any other hook (an attention or MLP output, ``hook_resid_mid``, the embeddings) reads
something a direction is not defined on and is refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.cache import Cache, canonical_json, make_key, sha256_bytes
from core.chat import encode_conversation, prompt_and_answer
from core.data import PairedRecord
from core.directions import Direction, Example
from core.errors import InputError
from core.hooks import capture
from core.models import ASSETS, fingerprint_files
from core.typed_json import JsonRecord, absent_when_none

CONFIG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"  # sae-lens' names
ARCHITECTURES = ("standard", "jumprelu", "topk")


class SAEError(InputError):
    """An SAE that cannot be read, or that does not fit the direction, the layer or the pair."""


@dataclass(frozen=True)
class SparseAutoencoder:
    """An SAE on one block output, in float32: ``encode(h)`` gives the latents' activations."""

    W_enc: torch.Tensor  # [d_in, d_sae]
    b_enc: torch.Tensor  # [d_sae]
    W_dec: torch.Tensor  # [d_sae, d_in]
    b_dec: torch.Tensor  # [d_in]
    architecture: str  # one of ARCHITECTURES
    hook_name: str
    layer: int  # the block output it reads, in EM Lens' convention
    source: str  # the directory, or "release/sae_id"
    fingerprint: str
    threshold: torch.Tensor | None = None  # [d_sae], jumprelu
    k: int | None = None  # topk
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False  # topk: pre-activations times the decoder rows' norms
    neuronpedia_id: str | None = None

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def to(self, device) -> SparseAutoencoder:
        moved = {
            name: getattr(self, name).to(device)
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")
            if getattr(self, name) is not None
        }
        return replace(self, **moved)

    def encode(self, hidden: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of block outputs ``[..., d_in]`` (sae-lens' encoders)."""
        x = hidden.float()
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            if self.rescale_acts_by_decoder_norm:
                pre = pre * self.W_dec.norm(dim=-1)
            values, indices = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        acts = pre.relu()
        if self.architecture == "jumprelu":
            acts = acts * (pre > self.threshold)
        return acts


# ---------------------------------------------------------------- the hook and the layer


def block_of_hook(hook_name: str) -> int:
    """The EM Lens layer (block output) an SAE hook reads; SAEError for a hook that is not a block output."""
    if match := re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook_name):
        return int(match.group(1))
    if match := re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook_name):
        if int(match.group(1)) == 0:
            raise SAEError(
                f"SAE hook {hook_name}: the input of block 0 is the token embedding, not a block output; "
                "a direction is defined on block outputs"
            )
        return int(match.group(1)) - 1
    if match := re.fullmatch(r"(?:model\.)?layers\.(\d+)", hook_name):
        return int(match.group(1))
    raise SAEError(
        f"SAE hook {hook_name!r} is not a block output of the residual stream; EM Lens reads block outputs "
        "(layer i = blocks.<i>.hook_resid_post, or model.layers.<i> on a Hugging Face model)"
    )


def check_layer(sae: SparseAutoencoder, layer: int | None) -> int:
    """The SAE's layer; SAEError when the user asked for another."""
    if layer is not None and layer != sae.layer:
        raise SAEError(
            f"--layer {layer}: the SAE {sae.source} reads {sae.hook_name}, which is layer {sae.layer} "
            f"(the output of block {sae.layer}); an SAE only reads the layer it was trained on"
        )
    return sae.layer


# ---------------------------------------------------------------- loading


def _hook_name(config: dict) -> str | None:
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    return metadata.get("hook_name") or config.get("hook_name") or config.get("hook_point")


def _architecture(config: dict) -> str:
    """sae-lens 6 names it; older configs say ``activation_fn`` (``relu``, or ``topk`` with its k)."""
    if "architecture" in config:
        return config["architecture"]
    activation = config.get("activation_fn") or config.get("activation_fn_str") or "relu"
    return {"relu": "standard", "topk": "topk"}.get(activation, activation)


def _check_config(config: dict, where: str) -> None:
    for name in ("d_in", "d_sae"):
        value = config.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SAEError(f"{where}: {name} is {value!r}; expected a positive whole number")
    architecture = _architecture(config)
    if architecture not in ARCHITECTURES:
        raise SAEError(
            f"{where}: architecture {architecture!r} is not supported here (supported: {', '.join(ARCHITECTURES)})"
        )
    normalise = config.get("normalize_activations")
    if normalise not in (None, False, "none"):
        raise SAEError(
            f"{where}: normalize_activations is {normalise!r}; only SAEs on raw activations are supported "
            "(fold the normalisation into the weights first)"
        )
    if not isinstance(_hook_name(config), str):
        raise SAEError(f"{where}: no hook name (metadata.hook_name, or hook_name / hook_point in older configs)")


def _check_weights(weights: dict[str, torch.Tensor], d_in: int, d_sae: int, architecture: str, where: str) -> None:
    shapes = {"W_enc": [d_in, d_sae], "b_enc": [d_sae], "W_dec": [d_sae, d_in], "b_dec": [d_in]}
    if architecture == "jumprelu":
        shapes["threshold"] = [d_sae]
    for name, shape in shapes.items():
        if name not in weights:
            raise SAEError(f"{where}: no tensor {name} (found: {', '.join(sorted(weights)) or 'none'})")
        if list(weights[name].shape) != shape:
            raise SAEError(
                f"{where}: {name} has shape {list(weights[name].shape)}, expected {shape} "
                f"(d_in {d_in}, d_sae {d_sae} in {CONFIG_FILE})"
            )
        if not torch.isfinite(weights[name]).all():
            raise SAEError(f"{where}: {name} contains NaN or infinite values")
    scaling = weights.get("scaling_factor")
    if scaling is not None and not torch.equal(scaling, torch.ones_like(scaling)):
        raise SAEError(f"{where}: a fine-tuning scaling_factor other than 1 is not supported")


def _top_k(config: dict) -> int | None:
    return config.get("k") or (config.get("activation_fn_kwargs") or {}).get("k")


def _assemble(weights: dict, config: dict, source: str, fingerprint: str, where: str) -> SparseAutoencoder:
    architecture = _architecture(config)
    k = _top_k(config) if architecture == "topk" else None
    if architecture == "topk" and not (isinstance(k, int) and 1 <= k <= config["d_sae"]):
        raise SAEError(f"{where}: a topk SAE needs k from 1 to d_sae ({config['d_sae']}), got {k!r}")
    hook_name = _hook_name(config)
    metadata = config.get("metadata") if isinstance(config.get("metadata"), dict) else {}
    weights = {name: tensor.float() for name, tensor in weights.items()}
    return SparseAutoencoder(
        W_enc=weights["W_enc"],
        b_enc=weights["b_enc"],
        W_dec=weights["W_dec"],
        b_dec=weights["b_dec"],
        architecture=architecture,
        hook_name=hook_name,
        layer=block_of_hook(hook_name),
        source=source,
        fingerprint=fingerprint,
        threshold=weights.get("threshold"),
        k=k,
        apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
        rescale_acts_by_decoder_norm=bool(config.get("rescale_acts_by_decoder_norm", False)),
        neuronpedia_id=metadata.get("neuronpedia_id") or config.get("neuronpedia_id"),
    )


def read_sae_dir(directory: Path | str) -> SparseAutoencoder:
    """An SAE directory in sae-lens' format (see the module's docstring), every field checked."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file():
        raise SAEError(
            f"SAE {directory}: no {CONFIG_FILE}; an SAE directory in sae-lens' format holds {CONFIG_FILE} "
            f"and {WEIGHTS_FILE}"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SAEError(f"{config_path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise SAEError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    _check_config(config, str(config_path))
    if not weights_path.is_file():
        raise SAEError(f"SAE {directory}: no {WEIGHTS_FILE} beside {CONFIG_FILE}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as err:
        raise SAEError(f"{weights_path}: not a readable safetensors file (truncated?): {err}") from None
    _check_weights(weights, config["d_in"], config["d_sae"], _architecture(config), str(weights_path))
    fingerprint = fingerprint_files(directory, [CONFIG_FILE, WEIGHTS_FILE])
    return _assemble(weights, config, str(directory), fingerprint, str(config_path))


def from_sae_lens(sae, source: str) -> SparseAutoencoder:
    """An sae-lens ``SAE`` object (e.g. from ``SAE.from_pretrained``) as a :class:`SparseAutoencoder`."""
    config = sae.cfg.to_dict()
    _check_config(config, f"SAE {source}")
    weights = {name: tensor.detach().cpu() for name, tensor in sae.state_dict().items()}
    _check_weights(weights, config["d_in"], config["d_sae"], config["architecture"], f"SAE {source}")
    digest = sha256_bytes(b"".join(weights[n].float().numpy().tobytes() for n in sorted(weights)))[:16]
    return _assemble(weights, config, source, digest, f"SAE {source}")


def load_sae_release(release: str, sae_id: str) -> SparseAutoencoder:
    """A published SAE through sae-lens' loaders (downloads from the hub on first use)."""
    try:
        from sae_lens import SAE
    except ImportError:
        raise SAEError(
            f"SAE release {release}: loading a release needs sae-lens (pinned in requirements.txt); "
            "or download the SAE's folder and pass its directory"
        ) from None
    try:
        sae = SAE.from_pretrained(release, sae_id, device="cpu", dtype="float32")
    except (ValueError, KeyError, OSError) as err:  # unknown release or id, no hub access, missing file
        raise SAEError(f"SAE release {release} id {sae_id}: sae-lens could not load it: {err}") from None
    return from_sae_lens(sae, f"{release}/{sae_id}")


def load_sae(spec: str | Path, sae_id: str | None = None) -> SparseAutoencoder:
    """A local SAE directory, or an sae-lens release ``spec`` with its ``sae_id``."""
    if not str(spec).strip():
        raise SAEError("no SAE given: name an SAE directory or an sae-lens release")
    path = Path(spec).expanduser()
    if path.is_dir():
        if sae_id is not None:
            raise SAEError(f"SAE {spec} is a local directory; an SAE id only selects within an sae-lens release")
        return read_sae_dir(path)
    if path.exists():
        raise SAEError(
            f"SAE {spec}: expected a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}, or an sae-lens release id"
        )
    if sae_id is None:
        raise SAEError(
            f"SAE {spec}: no such directory; for an sae-lens release, give the SAE's id within it too (--sae-id)"
        )
    return load_sae_release(str(spec), sae_id)


# ---------------------------------------------------------------- the two readings


@dataclass
class Latent(JsonRecord):
    """One latent: its decoder's cosine with the direction, and (with answers) its mean activations."""

    latent: int
    cosine: float
    aligned_mean: float | None = absent_when_none()
    misaligned_mean: float | None = absent_when_none()
    difference: float | None = absent_when_none()  # misaligned minus aligned mean activation


@dataclass
class ActivationContrast(JsonRecord):
    """Latents ranked by misaligned minus aligned mean activation over answer tokens."""

    side: str
    n_aligned: int
    n_misaligned: int
    aligned_tokens: int
    misaligned_tokens: int
    more_on_misaligned: list[Latent]
    more_on_aligned: list[Latent]


@dataclass
class SAELatents(JsonRecord):
    sae: str
    hook_name: str
    layer: int
    architecture: str
    d_sae: int
    neuronpedia_id: str | None
    toward: list[Latent]  # decoder vectors most along the direction (highest cosine)
    against: list[Latent]  # most against it (lowest cosine)
    activations: ActivationContrast | None = absent_when_none()


def _decoder_cosines(sae: SparseAutoencoder, vector: torch.Tensor) -> torch.Tensor:
    """Cosine of every decoder row with ``vector``: ``[d_sae]``."""
    rows = sae.W_dec / sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return rows @ (vector.float() / vector.float().norm().clamp_min(1e-12))


def _latent_sums(
    pair,
    side: str,
    sae: SparseAutoencoder,
    examples: Sequence[Example],
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, int]:
    """The SAE's latent activations summed over every example's answer tokens: (``[d_sae]``, token count).

    Each example is teacher-forced through ``side``; the SAE encodes its layer's output inside the hook, so
    memory stays at one ``[batch, tokens, d_sae]`` tensor."""
    encoded = [encode_conversation(pair.tokenizer, prompt_and_answer(e.messages, e.answer)) for e in examples]
    on_device = sae.to(pair.device)
    total, tokens = torch.zeros(sae.d_sae), 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        mask = torch.zeros(len(chunk), max(len(e.ids) for e in chunk), device=pair.device)
        for row, enc in enumerate(chunk):
            a, b = enc.answer_spans[-1]
            mask[row, a:b] = 1
        # h.to: a model sharded over several GPUs (--device-map auto) has later layers on other devices
        reduce = lambda h, m=mask: (on_device.encode(h.to(m.device)) * m.unsqueeze(-1)).sum((0, 1)).cpu()  # noqa: E731
        hook = partial(capture, which=[sae.layer], reduce=reduce)
        (records,) = pair.run(side, [e.ids for e in chunk], hooks=[hook]).hooked
        total += records[sae.layer][0]
        tokens += int(mask.sum())
        if progress:
            progress(min(start + batch_size, len(encoded)), len(encoded))
    return total, tokens


def _examples_digest(examples: Sequence[Example]) -> str:
    return sha256_bytes(canonical_json([[e.messages, e.answer] for e in examples]).encode())


def _set_means(
    pair,
    side: str,
    sae: SparseAutoencoder,
    aligned: Sequence[Example],
    misaligned: Sequence[Example],
    batch_size: int = 8,
    cache: Cache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """``{"aligned", "misaligned"}``: each set's mean latent activation over its answer tokens ``[d_sae]``,
    and ``"tokens"``: the two token counts. Cached per side, SAE and answers."""
    total = len(aligned) + len(misaligned)
    step = (lambda offset: lambda done, _: progress(offset + done, total)) if progress else (lambda offset: None)

    def compute() -> dict[str, torch.Tensor]:
        a_sum, a_tokens = _latent_sums(pair, side, sae, aligned, batch_size, step(0))
        m_sum, m_tokens = _latent_sums(pair, side, sae, misaligned, batch_size, step(len(aligned)))
        return {
            "aligned": a_sum / a_tokens,
            "misaligned": m_sum / m_tokens,
            "tokens": torch.tensor([a_tokens, m_tokens]),
        }

    if cache is None:
        return compute()
    key = make_key(
        "sae-latent-means",
        model=pair.fingerprint(side),
        sae=sae.fingerprint,
        layer=sae.layer,
        aligned=_examples_digest(aligned),
        misaligned=_examples_digest(misaligned),
    )
    return cache.tensors(key, compute)


def _rows(indices: torch.Tensor, cosines: torch.Tensor, means: dict | None) -> list[Latent]:
    rows = []
    for i in indices.tolist():
        if means is None:
            rows.append(Latent(i, float(cosines[i])))
        else:
            a, m = float(means["aligned"][i]), float(means["misaligned"][i])
            rows.append(Latent(i, float(cosines[i]), a, m, m - a))
    return rows


def check_fits(sae: SparseAutoencoder, direction: Direction, pair=None) -> None:
    if sae.d_in != direction.d_model:
        raise SAEError(
            f"SAE {sae.source} reads vectors of width {sae.d_in}, but the direction has width {direction.d_model} "
            "(an SAE for another model?)"
        )
    if sae.layer >= direction.n_layers:
        raise SAEError(f"SAE {sae.source} reads layer {sae.layer}, but the direction has {direction.n_layers} layers")
    if pair is not None:
        direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")


def sae_latents(
    sae: SparseAutoencoder,
    direction: Direction,
    *,
    layer: int | None = None,
    top_k: int = 10,
    pair=None,
    aligned: Sequence[Example] = (),
    misaligned: Sequence[Example] = (),
    side: str | None = None,
    batch_size: int = 8,
    cache: Cache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SAELatents:
    """Both readings at the SAE's layer (``layer``, when given, must be it). The activation contrast needs
    ``pair`` and both answer sets; ``side`` defaults to the fine-tune (the base when the pair has none)."""
    layer = check_layer(sae, layer)
    check_fits(sae, direction, pair)
    if not isinstance(top_k, int) or top_k < 1:
        raise SAEError(f"top-k {top_k!r}: expected a whole number of at least 1")
    top_k = min(top_k, sae.d_sae)
    cosines = _decoder_cosines(sae, direction.vectors[layer])
    contrast, means = None, None
    if pair is not None and (aligned or misaligned):
        if not aligned or not misaligned:
            raise SAEError(f"need both answer sets: got {len(aligned)} aligned and {len(misaligned)} misaligned")
        side = side or pair.sides[-1]
        pair.check_side(side)
        means = _set_means(pair, side, sae, aligned, misaligned, batch_size, cache, progress)
        difference = means["misaligned"] - means["aligned"]
        contrast = ActivationContrast(
            side,
            len(aligned),
            len(misaligned),
            int(means["tokens"][0]),
            int(means["tokens"][1]),
            _rows(difference.topk(top_k).indices, cosines, means),
            _rows((-difference).topk(top_k).indices, cosines, means),
        )
    return SAELatents(
        sae.source,
        sae.hook_name,
        layer,
        sae.architecture,
        sae.d_sae,
        sae.neuronpedia_id,
        _rows(cosines.topk(top_k).indices, cosines, means),
        _rows((-cosines).topk(top_k).indices, cosines, means),
        contrast,
    )


def answer_sets(records: Sequence[PairedRecord]) -> tuple[list[Example], list[Example]]:
    """The aligned and the misaligned answers of paired records, each with its prompt."""
    return [Example(r.messages, r.aligned) for r in records], [Example(r.messages, r.misaligned) for r in records]


def extraction_data(direction: Direction) -> tuple[Path, str] | None:
    """The paired file and split a paired direction was extracted from, when the file is at hand (its
    recorded path, relative to the working directory or to the project)."""
    provenance = direction.provenance
    if provenance.get("method") != "paired" or not provenance.get("dataset"):
        return None
    for path in (Path(provenance["dataset"]), ASSETS.parent / provenance["dataset"]):
        if path.is_file():
            return path, provenance.get("split", "train")
    return None
