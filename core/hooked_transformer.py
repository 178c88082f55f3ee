"""One side of the pair as a TransformerLens ``HookedTransformer``, for offline analysis only.

For users who want TransformerLens' tooling on the pair — attention patterns, ``run_with_cache``,
activation patching — :func:`hooked_transformer` converts one side into a ``HookedTransformer``: the
fine-tuned side is the LoRA adapter merged into a copy of the base weights (the held pair is left as it
is), the base side the same copy with the adapter removed.

It is never used to generate. TransformerLens' ``TransformerBridge`` (4.3) was seen to corrupt
KV-cached generation of Qwen2 and Llama models, and of the wrapped Hugging Face model after booting the
bridge, while uncached generation matched (DESIGN.md); everything in EM Lens that generates or steers
runs on the Hugging Face modules with plain forward hooks, which are exact with the KV cache. This module
builds the older ``HookedTransformer`` (it never boots the bridge), which TransformerLens 4.0 removed: the
pinned 3.9.0 is the last release line that has it.

Layer convention: TransformerLens' ``blocks.{i}.hook_resid_post`` is EM Lens' layer i (the output of
decoder block i). The model is loaded without TransformerLens' weight processing (no layer-norm folding,
no centring of the writing weights or the unembedding, no folding of value biases), so its residual
stream equals the Hugging Face model's, value for value (tested on the default pair); with folding the
residual stream is re-centred and no longer comparable with directions extracted here.

Feed it token ids rendered by ``core.chat`` (``encode_prompt``, ``encode_conversation``): the chat template
adds any BOS token itself, so strings given to TransformerLens' own methods get no extra BOS either.
"""

from __future__ import annotations

import copy
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version

import torch

from core.errors import InputError

PINNED = "3.9.0"  # requirements.txt


class TransformerLensError(InputError):
    """TransformerLens is missing, too new, or cannot convert this architecture."""


def resid_post(layer: int) -> str:
    """TransformerLens' hook name for EM Lens' layer ``layer`` (the output of decoder block ``layer``)."""
    return f"blocks.{layer}.hook_resid_post"


def _transformer_lens():
    try:
        installed = version("transformer-lens")
    except PackageNotFoundError:
        raise TransformerLensError(
            f"TransformerLens is not installed: pip install transformer-lens=={PINNED} (pinned in requirements.txt)"
        ) from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import transformer_lens.loading_from_pretrained as loading
            from transformer_lens import HookedTransformer
    except ImportError as err:  # 4.x raises ImportError with a migration note for HookedTransformer
        raise TransformerLensError(
            f"the installed TransformerLens {installed} has no HookedTransformer (removed in 4.0; its "
            f"TransformerBridge is not used here, see core/hooked_transformer.py): install "
            f"transformer-lens=={PINNED}. ({err})"
        ) from None
    return HookedTransformer, loading, installed


def _side_model(pair, side: str):
    """A Hugging Face model computing ``side`` on its own: merged / unloaded from a copy for an adapter pair."""
    pair.check_side(side)
    if not pair.is_adapter:
        return pair.module(side)
    with pair.lock:
        duplicate = copy.deepcopy(pair.model)
    return duplicate.merge_and_unload() if side == "finetuned" else duplicate.unload()


def hooked_transformer(pair, side: str = "finetuned", dtype: torch.dtype | None = None, device=None):
    """A ``HookedTransformer`` computing one side of ``pair`` (default: the fine-tune), on the pair's device
    and dtype unless given. An adapter pair costs a temporary copy of the weights while converting (the
    merge), and the result is a second model in memory."""
    HookedTransformer, loading, installed = _transformer_lens()
    dtype = dtype or pair.dtype
    device = device or pair.device
    model = _side_model(pair, side)
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    with tempfile.TemporaryDirectory(prefix="emlens-") as config_dir:
        # TransformerLens reads a local model's config from a directory; the in-memory config is the truth
        # (the pair may come from a GGUF file, a hub id or a merged fine-tune), so it is written out here.
        model.config.save_pretrained(config_dir)
        try:
            config = loading.get_pretrained_model_config(
                config_dir,
                hf_cfg=model.config.to_dict(),
                fold_ln=False,
                device=device,
                dtype=dtype,
                default_prepend_bos=False,
            )
            state_dict = loading.get_pretrained_state_dict(config_dir, config, model, dtype=dtype)
        except (NotImplementedError, ValueError) as err:
            raise TransformerLensError(
                f"TransformerLens {installed} cannot load the {architecture} architecture of this pair: {err}"
            ) from None
    config.model_name = f"{pair.base.spec}:{side}"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)
        hooked = HookedTransformer(config, pair.tokenizer, move_to_device=False)
    hooked.load_and_process_state_dict(
        state_dict,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
        refactor_factored_attn_matrices=False,
    )
    hooked.move_model_modules_to_device()
    return hooked.eval()
