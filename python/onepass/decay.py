"""Weight-decay practice around the optimizer: which params decay, how strong, how fast.

- :func:`param_groups` splits a model's params into a decayed group and a no-decay group (biases,
  normalization weights, embeddings), the usual practice since AdamW (Loshchilov & Hutter): a
  shrink pulls a norm's gain or a bias towards 0, which is not a prior anyone wants.
- :func:`normalized_weight_decay`: the paper's normalized decay λ = λ_norm·√(b/(B·T)), so one
  λ_norm carries over between batch sizes, dataset sizes and training lengths.
- :func:`decay_half_life`: steps until decay alone halves a weight, ln 0.5 / ln(1 − ηλ)
  (≈ ln 2/(ηλ) for small ηλ); decay strength is the product ηλ, so λ ∝ 1/η keeps it.

The decay modes themselves ("decoupled", "lr_independent", "coupled") are optimizer options
(``onepass.AdamW(..., decay_mode=...)``); their arithmetic is in :mod:`onepass.reference`.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any, Dict, Iterable, List, Tuple, Type, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["param_groups", "normalized_weight_decay", "decay_half_life", "NORM_TYPES",
           "EMBEDDING_TYPES"]

# Normalization layers by type. _NormBase covers BatchNorm1d/2d/3d, SyncBatchNorm, the lazy
# variants and InstanceNorm*; RMSNorm exists from torch 2.4.
NORM_TYPES: Tuple[Type[nn.Module], ...] = tuple(
    t for t in (nn.LayerNorm, getattr(nn, "RMSNorm", None), nn.GroupNorm, nn.LocalResponseNorm,
                nn.modules.batchnorm._NormBase)
    if t is not None
)
EMBEDDING_TYPES: Tuple[Type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)

Rule = Union[str, Type[nn.Module]]


def _norm_like(module: nn.Module) -> bool:
    # Models define their own norms (e.g. "LlamaRMSNorm", "T5LayerNorm") without subclassing
    # torch's: a class name that ends in "Norm" counts as one too.
    return isinstance(module, NORM_TYPES) or type(module).__name__.endswith("Norm")


def _is_bias(local: str) -> bool:
    # torch's own modules name biases with "bias" as one word of a longer name too:
    # MultiheadAttention's in_proj_bias / bias_k / bias_v, LSTM's bias_ih_l0 / bias_hh_l0_reverse
    return "bias" in local.split("_")


def _parametrized_owners(model: nn.Module) -> Dict[int, Tuple[nn.Module, str]]:
    """A parametrized tensor's params live in a ParametrizationList
    (``ln.parametrizations.weight.original``, or ``original0``/``original1`` for weight_norm):
    the rules apply to the module that owns the tensor and to the tensor's name, by the list."""
    owners: Dict[int, Tuple[nn.Module, str]] = {}
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for tname, plist in module.parametrizations.items():
                owners[id(plist)] = (module, tname)
    return owners


def param_groups(
    model: nn.Module,
    weight_decay: float,
    no_decay: Iterable[Rule] = (),
    *,
    decay_embeddings: bool = False,
    report: bool = False,
) -> Union[List[Dict[str, Any]], Tuple[List[Dict[str, Any]], Dict[str, Any]]]:
    """Param groups for an optimizer: ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": not decayed, "weight_decay": 0.0}]`` (an empty group is left out).

    No decay for: every param named ``bias`` or with ``bias`` as one ``_``-separated word of its
    name (``in_proj_bias``, ``bias_ih_l0``); every param of a normalization module (by type:
    :data:`NORM_TYPES`, or a class name ending in "Norm"); every param of an embedding module
    (:data:`EMBEDDING_TYPES`) unless ``decay_embeddings``; and whatever ``no_decay`` adds: module
    types (all their params) or shell patterns matched against full param names
    (``"*.pos_emb"``, ``"head.*"``).

    Params come as ``(name, tensor)`` pairs, so torch's optimizers record ``param_names`` in each
    group. A tensor shared by several modules (tied weights, e.g. an embedding reused as the output
    projection) is listed once, under its first name; it gets no decay if any of its owners says
    so. A parametrized tensor (``torch.nn.utils.parametrize``: ``ln.parametrizations.weight.original``)
    follows the rules of the module and name it parametrizes. With ``report=True`` the return value is ``(groups, report)``: ``report["decay"]`` and
    ``report["no_decay"]`` list the names, ``report["why"]`` says why each no-decay param is there
    and ``report["tied"]`` maps a shared tensor's name to its other names.
    """
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"onepass: weight_decay must be >= 0, got {weight_decay!r}")
    rules = list(no_decay)
    for r in rules:
        if not (isinstance(r, str) or (isinstance(r, type) and issubclass(r, nn.Module))):
            raise TypeError(f"onepass: no_decay takes module types or name patterns, got {r!r}")
    types = tuple(r for r in rules if isinstance(r, type))
    patterns = [r for r in rules if isinstance(r, str)]

    first_name: Dict[int, str] = {}
    tensors: Dict[int, torch.Tensor] = {}
    why: Dict[int, str] = {}
    tied: Dict[int, List[str]] = {}
    owners = _parametrized_owners(model)
    for mod_name, holder in model.named_modules(remove_duplicate=False):
        for held, p in holder.named_parameters(recurse=False):
            name = f"{mod_name}.{held}" if mod_name else held
            module, local = owners.get(id(holder), (holder, held))
            key = id(p)
            if key in first_name:
                if name != first_name[key] and name not in tied.setdefault(key, []):
                    tied[key].append(name)
            else:
                first_name[key] = name
                tensors[key] = p
            reason = None
            if types and isinstance(module, types):
                reason = f"type {type(module).__name__}"
            elif _norm_like(module):
                reason = f"norm {type(module).__name__}"
            elif isinstance(module, EMBEDDING_TYPES) and not decay_embeddings:
                reason = f"embedding {type(module).__name__}"
            elif _is_bias(local):
                reason = "bias"
            else:
                hit = next((pat for pat in patterns if fnmatch.fnmatchcase(name, pat)), None)
                if hit is not None:
                    reason = f"pattern {hit!r}"
            if reason is not None and key not in why:
                why[key] = reason
    # named_modules' first-occurrence order is model.parameters()' order: stable across runs
    order = list(first_name)
    decay = [(first_name[k], tensors[k]) for k in order if k not in why]
    keep = [(first_name[k], tensors[k]) for k in order if k in why]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": float(weight_decay)})
    if keep:
        groups.append({"params": keep, "weight_decay": 0.0})
    if not report:
        return groups
    info = {
        "decay": [n for n, _ in decay],
        "no_decay": [n for n, _ in keep],
        "why": {first_name[k]: why[k] for k in order if k in why},
        "tied": {first_name[k]: names for k, names in tied.items() if names},
    }
    return groups, info


def normalized_weight_decay(lambda_norm: float, batch_size: int, n_train: int, epochs: float) -> float:
    """λ = λ_norm·√(b / (B·T)) for batch size b, B training points and T epochs (Loshchilov &
    Hutter's normalized weight decay): the total decay over a run then depends on λ_norm only.
    """
    if not float(lambda_norm) >= 0.0:
        raise ValueError(f"onepass: lambda_norm must be >= 0, got {lambda_norm!r}")
    for what, x in (("batch_size", batch_size), ("n_train", n_train), ("epochs", epochs)):
        if not float(x) > 0.0:
            raise ValueError(f"onepass: {what} must be > 0, got {x!r}")
    return float(lambda_norm) * math.sqrt(float(batch_size) / (float(n_train) * float(epochs)))


def decay_half_life(lr: float, weight_decay: float) -> float:
    """Steps until decoupled decay alone (zero update) halves a weight: ln 0.5 / ln(1 − ηλ).

    ≈ ln 2/(ηλ) when ηλ is small; ``inf`` without decay.
    """
    lr = float(lr)
    weight_decay = float(weight_decay)
    if not lr >= 0.0 or not weight_decay >= 0.0:
        raise ValueError(f"onepass: lr and weight_decay must be >= 0, got {lr!r}, {weight_decay!r}")
    shrink = lr * weight_decay
    if shrink == 0.0:
        return math.inf
    if shrink >= 1.0:
        raise ValueError(f"onepass: lr * weight_decay = {shrink} >= 1 flips or zeroes every weight")
    # log1p keeps ln(1 − ηλ) accurate at ηλ ~ 1e-7, where 1 − ηλ loses half its digits
    return math.log(0.5) / math.log1p(-shrink)
