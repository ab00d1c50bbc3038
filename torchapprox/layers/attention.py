"""nn.MultiheadAttention computed with quantized projections.

``F.multi_head_attention_forward`` projects its inputs itself, with whatever weights it is
handed, and applies the output projection inside, where its input cannot be quantized.
This forward does the same computation in steps that take quantized tensors: the input
projections through ``quantized_linear`` (query, key and value quantized by the layer's
``input``, ``key`` and ``value`` quantizers, weights by ``in_proj_weight`` or
``q/k/v_proj_weight``), then the attention as torch computes it (explicit softmax when the
weights are asked for, ``scaled_dot_product_attention`` otherwise), then a call of the
layer's own ``out_proj`` module, which is quantized as any ``nn.Linear`` (or excluded).
The arguments and the return value are those of ``nn.MultiheadAttention.forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import quantized_linear, quantized_weight


def _same_tensors(function, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``function`` applied to each distinct tensor once, so that "query is key" (the mark
    of self-attention) still holds afterwards."""
    done: dict[int, Tensor] = {}
    for tensor in (query, key, value):
        if id(tensor) not in done:
            done[id(tensor)] = function(tensor)
    return done[id(query)], done[id(key)], done[id(value)]


def _float_mask(mask: Tensor | None, dtype: torch.dtype, name: str) -> Tensor | None:
    # As torch does: a boolean mask marks with True what may not be attended (-inf added).
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise AssertionError(f"only bool and floating types of {name} are supported")
    return mask


def _split(tensor: Tensor | None, sizes: list[int]) -> list[Tensor | None]:
    return [None] * len(sizes) if tensor is None else list(tensor.split(sizes))


def _project(layer: nn.MultiheadAttention, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    embed = layer.embed_dim
    if layer.in_proj_weight is None:  # separate weights (key or value of another size)
        bias = _split(layer.in_proj_bias, [embed] * 3)
        weights = [quantized_weight(layer, f"{n}_proj_weight") for n in ("q", "k", "v")]
        return (quantized_linear(layer, query, weights[0], bias[0], "input"),
                quantized_linear(layer, key, weights[1], bias[1], "key"),
                quantized_linear(layer, value, weights[2], bias[2], "value"))
    weight, bias = quantized_weight(layer, "in_proj_weight"), layer.in_proj_bias
    if key is value:
        if query is key:  # self-attention: one projection of one quantized tensor
            return tuple(quantized_linear(layer, query, weight, bias, "input").chunk(3, dim=-1))
        weight_q, weight_kv = weight.split([embed, 2 * embed])
        bias_q, bias_kv = _split(bias, [embed, 2 * embed])
        key_value = quantized_linear(layer, key, weight_kv, bias_kv, "key").chunk(2, dim=-1)
        return (quantized_linear(layer, query, weight_q, bias_q, "input"), *key_value)
    weights, biases = weight.chunk(3), _split(bias, [embed] * 3)
    return tuple(quantized_linear(layer, t, w, b, n)
                 for t, w, b, n in zip((query, key, value), weights, biases, ("input", "key", "value")))


def multihead_attention_forward(
    layer: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    batched = query.dim() == 3
    if layer.batch_first and batched:
        query, key, value = _same_tensors(lambda t: t.transpose(1, 0), query, key, value)
    if not batched:
        query, key, value = _same_tensors(lambda t: t.unsqueeze(1), query, key, value)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    target_length, batch, embed = query.shape
    if embed != layer.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {layer.embed_dim}, but got {embed}")
    heads = layer.num_heads
    head_dim = embed // heads

    key_padding_mask = _float_mask(key_padding_mask, query.dtype, "key_padding_mask")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
    else:
        attn_mask = _float_mask(attn_mask, query.dtype, "attn_mask")
        if key_padding_mask is not None:
            is_causal = False  # merged with the padding mask, the mask is no longer causal
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)

    q, k, v = _project(layer, query, key, value)
    if layer.bias_k is not None and layer.bias_v is not None:
        k = torch.cat([k, layer.bias_k.repeat(1, batch, 1)])
        v = torch.cat([v, layer.bias_v.repeat(1, batch, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    # (length, batch, embed) -> (batch * heads, length, head_dim)
    q = q.reshape(target_length, batch * heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], batch * heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], batch * heads, head_dim).transpose(0, 1)
    if layer.add_zero_attn:
        zeros = k.new_zeros((batch * heads, 1, head_dim))
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    source_length = k.shape[1]
    if key_padding_mask is not None:
        padding = (key_padding_mask.view(batch, 1, 1, source_length).expand(-1, heads, -1, -1)
                   .reshape(batch * heads, 1, source_length))
        attn_mask = padding if attn_mask is None else attn_mask + padding
    dropout = layer.dropout if layer.training else 0.0

    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(scores, dim=-1)
        if dropout > 0.0:
            weights = F.dropout(weights, p=dropout)
        attended = torch.bmm(weights, v).transpose(0, 1).reshape(target_length * batch, embed)
        weights = weights.view(batch, heads, target_length, source_length)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            if attn_mask.shape[0] == 1:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(batch, heads, -1, source_length)
        attended = F.scaled_dot_product_attention(
            q.reshape(batch, heads, target_length, head_dim), k.reshape(batch, heads, source_length, head_dim),
            v.reshape(batch, heads, source_length, head_dim), attn_mask, dropout, is_causal,
        ).permute(2, 0, 1, 3).reshape(target_length * batch, embed)
    output = layer.out_proj(attended).view(target_length, batch, -1)

    if not batched:
        output = output.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    elif layer.batch_first:
        output = output.transpose(1, 0)
    return output, weights
