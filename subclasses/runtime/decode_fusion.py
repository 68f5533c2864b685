"""Fused int4 projections for one-token decode steps: q/k/v as one GEMV, gate/up as one.

At M = 1 each int4 linear is one call of the C++ GEMV, and a small one (SmolLM2's 192 x 576 k/v
projections: ~3 us of bytes) pays a fixed cost per call several times its bytes (the call, the
activation quantization, the threads' fork/join). ``unwrap_cpu::int4_gemv_cat`` takes several
weights of one input and runs them as one parallel loop, row results equal to separate calls: 7
GEMVs per decoder layer become 4.

``fuse_decode_projections(model)`` gives the attention and MLP modules of the families below a
forward that projects through it (an instance attribute: the class, the parameters and the
state_dict are untouched; weights are read on every call, as before). Any call it cannot fuse
(more than one row, weights that are not int4 in the CPU packing, fp32 activations, no kernel)
runs the separate linears, so prefill and other models keep their own path. The attention forward
is transformers' (Llama, Qwen2, Mistral) with the projections swapped; keep it in step with theirs. The MLP
forward is theirs too (Llama, Qwen2, Qwen3, Mistral, Gemma 2 and 3). Phi-3 stores q/k/v and gate/up as
one weight each already.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..formats.int4 import Int4WeightTensor, Packing
from ..kernels.int4_gemv import int4_gemv_cat, traced_kernel_available

# transformers classes whose forward the fused one reproduces (same projections, same steps).
ATTENTION_CLASSES = ("LlamaAttention", "Qwen2Attention", "MistralAttention")
# the same forward as LlamaMLP's: down(act(gate(x)) * up(x))
MLP_CLASSES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP", "Gemma2MLP", "Gemma3MLP")


def _fusable(x2d: torch.Tensor, weights: Sequence[Any]) -> bool:
    first = weights[0]
    return (
        x2d.dtype != torch.float32  # fp32 keeps aten's kernel (int4_gemv.py: its precision)
        and all(
            isinstance(w, Int4WeightTensor)
            and w.packing == Packing.CPU
            and w.group_size == first.group_size
            and w.scale_and_zero.dtype == x2d.dtype
            and w.shape[1] == x2d.shape[1]
            for w in weights
        )
        and traced_kernel_available()
    )


def project(x: torch.Tensor, linears: Sequence[Any]) -> list[torch.Tensor]:
    """``[linear(x) for linear in linears]``; for one row of int4 weights in the CPU packing, one
    ``int4_gemv_cat`` call (each output equal to its own GEMV's), biases added after."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[0] != 1 or not x2d.is_contiguous():
        return [linear(x) for linear in linears]
    weights: list[Any] = [linear.weight for linear in linears]
    if not _fusable(x2d, weights):
        return [linear(x) for linear in linears]
    fused = int4_gemv_cat(x2d, [w.packed for w in weights], weights[0].group_size, [w.scale_and_zero for w in weights])
    outputs = fused.split([w.shape[0] for w in weights], dim=-1)
    return [
        (out if linear.bias is None else out + linear.bias).view(*x.shape[:-1], -1)
        for out, linear in zip(outputs, linears, strict=True)
    ]


def mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' ``LlamaMLP.forward`` with gate and up projected together."""
    gate, up = project(x, (self.gate_proj, self.up_proj))
    return self.down_proj(self.act_fn(gate) * up)


def attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' ``LlamaAttention.forward`` / ``Qwen2Attention.forward`` / ``MistralAttention.forward``
    (5.x) with q, k and v projected together."""
    if cache is None:  # the name before transformers 5.40
        cache = kwargs.pop("past_key_values", None)
    family = sys.modules[type(self).__module__]  # its apply_rotary_pos_emb, attention functions
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    q, k, v = project(hidden_states, (self.q_proj, self.k_proj, self.v_proj))
    query_states, key_states = family.apply_rotary_pos_emb(
        q.view(hidden_shape).transpose(1, 2), k.view(hidden_shape).transpose(1, 2), *position_embeddings
    )
    value_states = v.view(hidden_shape).transpose(1, 2)
    if cache is not None:
        key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
    attention = family.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, family.eager_attention_forward
    )
    if hasattr(self, "sliding_window"):  # Qwen2
        kwargs["sliding_window"] = self.sliding_window
    elif type(self).__name__ == "MistralAttention":
        kwargs["sliding_window"] = getattr(self.config, "sliding_window", None)
    attn_output, attn_weights = attention(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **kwargs,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def fuse_decode_projections(model: nn.Module) -> int:
    """Give every attention and MLP module of ``model`` of a family above the fused forward (in place,
    an instance attribute; parameters and state_dict unchanged). Returns how many modules got it."""
    count = 0
    for module in model.modules():
        name = type(module).__name__
        if name in ATTENTION_CLASSES:
            module.forward = types.MethodType(attention_forward, module)
        elif name in MLP_CLASSES:
            module.forward = types.MethodType(mlp_forward, module)
        else:
            continue
        count += 1
    return count


__all__ = ["attention_forward", "fuse_decode_projections", "mlp_forward", "project"]
