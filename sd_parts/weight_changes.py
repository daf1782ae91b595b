"""How much each layer of a model changed: ||W_new - W|| / ||W|| per weight, and what the layer
is (attention in, attention out, resblock conv, ...), for a fine-tune against its base or for a
LoRA's effective change (``sd_parts.lora.lora_changes``)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import NamedTuple

import torch

from .weights import _name_list


class WeightChange(NamedTuple):
    name: str  # the parameter, e.g. "up_blocks.1.attentions.0.proj_in.weight"
    relative: float  # ||W_new - W|| / ||W|| (Frobenius norms)
    kind: str  # what the layer is, see layer_kind


# what a parameter is, by its name (the first rule that matches): for colouring layers in a view
LAYER_KINDS = [
    (r"attn2\.to_[kv]", "cross-attention k/v"),
    (r"attn[12]\.to_q|attn1\.to_[kv]|attentions\.\d+\.to_[qkv]", "attention q/k/v"),
    (r"attn[12]\.to_out|attentions\.\d+\.to_out", "attention out"),
    (r"ff\.net", "feed-forward"),
    (r"proj_(in|out)", "transformer projection"),
    (r"resnets\.\d+\.conv[12]", "resblock conv"),
    (r"resnets\.\d+\.conv_shortcut", "resblock shortcut"),
    (r"resnets\.\d+\.time_emb_proj", "resblock time projection"),
    (r"(down|up)samplers\.\d+\.conv", "resampling conv"),
    (r"self_attn\.[qkv]_proj", "text attention q/k/v"),
    (r"self_attn\.out_proj", "text attention out"),
    (r"mlp\.fc[12]", "text feed-forward"),
    (r"token_embedding", "token embedding"),
    (r"position_embedding", "position embedding"),
    (r"time_embedding", "time embedding"),
    (r"conv_(in|out)", "in/out conv"),
    (r"norm\d?|layer_norm\d?|final_layer_norm|group_norm|conv_norm_out", "norm"),
]
_LAYER_KINDS = [(re.compile(rf"(^|\.)({pattern})(\.|$)"), kind) for pattern, kind in LAYER_KINDS]


def layer_kind(name: str) -> str:
    """What the layer named ``name`` (module or parameter) is, e.g. "cross-attention k/v"."""
    return next((kind for pattern, kind in _LAYER_KINDS if pattern.search(name)), "other")


def _relative(weight: torch.Tensor, delta: torch.Tensor) -> float:
    size = torch.linalg.vector_norm(weight.double()).item()
    change = torch.linalg.vector_norm(delta.double()).item()
    return change / size if size else (0.0 if change == 0 else math.inf)


def weight_changes(base_state: Mapping[str, torch.Tensor], new_state: Mapping[str, torch.Tensor]
                   ) -> list[WeightChange]:
    """Per floating-point tensor of two state dicts of one model (a base and a fine-tune),
    ||new - base|| / ||base|| and what the layer is, in ``base_state``'s order. Both must hold the
    same names and shapes."""
    missing = sorted(set(base_state) ^ set(new_state))
    wrong = sorted(name for name in base_state if name in new_state
                   and base_state[name].shape != new_state[name].shape)
    if missing or wrong:
        raise ValueError("the two state dicts are not of one model: "
                         + "; ".join(filter(None, [
                             missing and f"names in only one: {_name_list(missing, limit=6)}",
                             wrong and f"different shapes: {_name_list(wrong, limit=6)}"])))
    return [WeightChange(name, _relative(base, new_state[name].to(base.device).double()
                                         - base.double()), layer_kind(name))
            for name, base in base_state.items() if base.is_floating_point()]
