"""One generic loader: build the model from its config, then feed it checkpoint tensors.

The loader maps checkpoint names onto parameters (through the model's `packed_modules` for fused
parameters) and calls each parameter's own `weight_loader`, which knows how to slice for tensor
parallelism. It never inspects shapes itself.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from kvflow.attention.layer import Attention
from kvflow.model_config import ModelConfig
from kvflow.layers.linear import default_weight_loader
from kvflow.models.dummy import init_dummy_weights  # noqa: F401 - re-exported (sleep.py)
from kvflow.models.registry import get_model_class

logger = logging.getLogger("kvflow")

# Checkpoint tensors that carry no model state we use.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# Per-layer fp8 KV cache scales (buffers of the Attention layer, not parameters): FP8
# checkpoints spell them "<layer>.self_attn.k_scale" or "<layer>.self_attn.attn.k_scale".
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


def _kv_scale_target(attn_layers: dict, name: str):
    """(Attention layer, "k_scale" | "v_scale") a checkpoint scale belongs to, or (None, _)."""
    prefix, which = name.rsplit(".", 1)
    for path in (prefix, prefix + ".attn"):
        if path in attn_layers:
            return attn_layers[path], which
    return None, which


def iterate_safetensors(model_dir: str, wanted: Callable[[str], bool] = lambda name: True
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every checkpoint tensor; names `wanted` rejects are never read."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(model_dir, name) for name in files]
    else:
        files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        raise ValueError(f"model: no *.safetensors weights in {model_dir!r} "
                         "(use load_format='dummy' for random weights)")
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for name in f.keys():
                if wanted(name):
                    yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                 strict: bool = True) -> set[str]:
    """Returns the names of the parameters written. strict=False allows a subset (a trainer
    sending updated weights in several batches); strict raises on any missing parameter."""
    params = dict(model.named_parameters())  # tied parameters appear once
    packed = getattr(model, "packed_modules", [])
    # MoE: per-expert checkpoint tensors -> stacked parameters, shard id (expert id, w1/w2/w3).
    experts = getattr(model, "expert_params_mapping", [])
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    # Multimodal checkpoints served text-only: the model declares how the language model's
    # names are prefixed ({"language_model.": ""}) and which towers it does not build.
    renames = getattr(model, "checkpoint_prefix_renames", {})
    skipped_prefixes = tuple(getattr(model, "skipped_checkpoint_prefixes", ()))
    seen: set[str] = set()
    unexpected = []
    skipped = 0
    attn_layers = None
    for name, tensor in weights:
        if skipped_prefixes and name.startswith(skipped_prefixes):
            skipped += 1
            continue
        for old, new in renames.items():
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight"):
            continue
        if name.endswith(_KV_SCALE_SUFFIXES):
            if attn_layers is None:
                attn_layers = {n: m for n, m in model.named_modules() if isinstance(m, Attention)}
            layer, which = _kv_scale_target(attn_layers, name)
            if layer is None:
                unexpected.append(name)
            else:
                try:
                    layer.load_kv_scale(which, tensor)
                except ValueError as e:
                    raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
            continue
        shard = None
        target = name
        for param_frag, ckpt_frag, expert_id, which in (experts if ".experts." in name else ()):
            if name.endswith(ckpt_frag):   # checked before packed: Qwen3-MoE experts say gate_proj
                target, shard = name[:-len(ckpt_frag)] + param_frag, (expert_id, which)
                break
        else:
            for param_name, ckpt_name, shard_id in packed:
                if f".{ckpt_name}." in name:
                    target, shard = name.replace(f".{ckpt_name}.", f".{param_name}."), shard_id
                    break
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor, shard) if shard is not None else loader(param, tensor)
        except ValueError as e:
            raise ValueError(f"checkpoint tensor {name!r}: {e}") from None
        seen.add(target)
    # Parameters with a correct default may be absent (e.g. GPTQ g_idx without act-order).
    missing = sorted(n for n in set(params) - seen
                     if not getattr(params[n], "optional_in_checkpoint", False))
    if missing and strict:
        raise ValueError(f"checkpoint is missing weights for {len(missing)} parameters, e.g. {missing[:5]}")
    if skipped:
        logger.info("skipped %d checkpoint tensors of parts this model does not serve (%s)",
                    skipped, ", ".join(p.rstrip(".") for p in skipped_prefixes))
    if unexpected:
        logger.warning("ignored %d checkpoint tensors with no matching parameter, e.g. %s",
                       len(unexpected), unexpected[:5])
    return seen


def remote_expert_filter(model: nn.Module) -> Callable[[str], bool]:
    """With expert parallel, a checkpoint name -> False for experts another rank owns, so they
    are not even read from disk (their weight_loader would skip them anyway)."""
    from kvflow.layers.moe import FusedMoE
    placement = next((m.placement for m in model.modules() if isinstance(m, FusedMoE)), None)
    if placement is None or not placement.is_partitioned:
        return lambda name: True
    local = placement.local
    expert_id = re.compile(r"\.experts\.(\d+)\.")   # the checkpoints' per-expert spelling

    def wanted(name: str) -> bool:
        m = expert_id.search(name)
        return m is None or int(m.group(1)) in local
    return wanted


def build_model(cfg: ModelConfig, device: torch.device) -> nn.Module:
    cls = get_model_class(cfg.architecture)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(cfg.dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    if cfg.load_format == "dummy":
        init_dummy_weights(model, cfg.seed)
    else:
        load_weights(model, iterate_safetensors(cfg.model, remote_expert_filter(model)))
    return model.eval()
