"""A forward pass for Llama-family models on CPU with fewer, larger operations.

Decoding one token of SmolLM2-135M through transformers' modules took 19.7 ms on this CPU, of
which the linear layers were 12.6: the rest was the cost of issuing small operations one by one
(transformers' RMSNorm is 7 ops, ~11 us at 576 wide; `F.rms_norm` one call, ~8 us, same result).
A step reads 538 MB of weights, so the products themselves are bound by memory bandwidth, and
larger ones stream better: the query, key and value projections as one product (960 x 576)
take 39 us against 59 us for the three, and all of a step's products take 10.2 ms fused
against 11.8 ms apart. A step at one row, both in one process: 17.8 ms -> 13.8 ms.

`FusedLlama` is a drop-in for the model's call in the embedded engine (same arguments, an
output with `.logits`): per layer one RMSNorm op, one QKV product, rotary embedding on queries
and keys together, the KV cache's update, attention (`sdpa_gqa_attention`, which reads a
batch's shared prompt head once), the output projection, one RMSNorm op, one gate-and-up
product, SiLU, the down projection. Same formulas as transformers' Llama, in the same order,
so the logits agree to rounding (the products' summation order is oneDNN's either way).

It takes over the model's own modules (embeddings, norms, rotary embedding, output and down
projections, the LM head) and builds the two fused products from the separate ones, which are
then let go: the weights are not held twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.modeling_outputs import CausalLMOutputWithPast

from .kernels import sdpa_gqa_attention


def fusable(model) -> bool:
    """Whether `model` is a Llama that `FusedLlama` runs with transformers' own formulas (fp32 on CPU,
    no tensor-parallel slicing, SiLU MLP); anything else keeps transformers' forward."""
    config = model.config
    inner = getattr(model, "model", None)
    if getattr(config, "model_type", None) != "llama" or inner is None or not hasattr(inner, "layers"):
        return False
    if getattr(config, "pretraining_tp", 1) != 1 or getattr(config, "hidden_act", "silu") != "silu":
        return False
    layer = inner.layers[0]
    parts = [getattr(layer.self_attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")] + [
        getattr(layer.mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")
    ]
    return all(
        type(p) is torch.nn.Linear and p.weight.dtype == torch.float32 and p.weight.device.type == "cpu" for p in parts
    )


def _fused_linear(*linears: torch.nn.Linear) -> torch.nn.Linear:
    """One linear layer computing `linears` side by side (their outputs concatenated)."""
    bias = linears[0].bias is not None
    fused = torch.nn.Linear(linears[0].in_features, sum(x.out_features for x in linears), bias=bias)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([x.weight for x in linears]))
        if bias:
            fused.bias.copy_(torch.cat([x.bias for x in linears]))
    return fused.requires_grad_(False)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class FusedLlamaLayer(torch.nn.Module):
    """One decoder layer: attention and MLP, each behind an RMSNorm and added to the residual."""

    is_causal = True  # read by sdpa_gqa_attention, in place of transformers' attention module

    def __init__(
        self,
        input_norm,
        post_attention_norm,
        qkv,
        o_proj,
        gate_up,
        down_proj,
        *,
        heads: int,
        kv_heads: int,
        head_dim: int,
        scaling: float,
    ):
        super().__init__()
        self.input_norm, self.post_attention_norm = input_norm, post_attention_norm
        self.qkv, self.o_proj, self.gate_up, self.down_proj = qkv, o_proj, gate_up, down_proj
        self.heads, self.kv_heads, self.head_dim, self.scaling = heads, kv_heads, head_dim, scaling
        self.num_key_value_groups = heads // kv_heads

    @classmethod
    def of(cls, layer, config) -> FusedLlamaLayer:
        """The fused form of one of transformers' Llama decoder layers."""
        attention, mlp = layer.self_attn, layer.mlp
        return cls(
            layer.input_layernorm,
            layer.post_attention_layernorm,
            _fused_linear(attention.q_proj, attention.k_proj, attention.v_proj),
            attention.o_proj,
            _fused_linear(mlp.gate_proj, mlp.up_proj),
            mlp.down_proj,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            head_dim=attention.head_dim,
            scaling=attention.scaling,
        )

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        index: int,
        shared_head: int,
    ) -> torch.Tensor:
        width = hidden.shape[-1]
        x = F.rms_norm(hidden, (width,), self.input_norm.weight, self.input_norm.variance_epsilon)
        hidden = hidden + self.o_proj(self.attend(self.qkv(x), cos, sin, mask, cache, index, shared_head))
        x = F.rms_norm(hidden, (width,), self.post_attention_norm.weight, self.post_attention_norm.variance_epsilon)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)

    def attend(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        index: int,
        shared_head: int,
    ) -> torch.Tensor:
        """Attention's output (rows, length, heads x head_dim) from the QKV product's."""
        rows, length, _ = qkv.shape
        qkv = qkv.view(rows, length, self.heads + 2 * self.kv_heads, self.head_dim).transpose(1, 2)
        rotated = qkv[:, : self.heads + self.kv_heads]  # queries and keys rotate together: one pass
        rotated = rotated * cos + _rotate_half(rotated) * sin
        keys, values = cache.update(rotated[:, self.heads :], qkv[:, self.heads + self.kv_heads :], index)
        attended, _ = sdpa_gqa_attention(
            self, rotated[:, : self.heads], keys, values, mask, scaling=self.scaling, shared_head=shared_head
        )
        return attended.reshape(rows, length, -1)


class DraftLlamaLayer(FusedLlamaLayer):
    """A decoder layer of the draft model: its products low-bit (`kernels.Int4Linear` or `Int8Linear`,
    bf16 in and out), and each RMSNorm split around the product that follows it. A product is linear,
    so the norm's weight (times sqrt(width)) scales the product's input and 1 / ||x|| its output:
    `||x||` is one op where `F.rms_norm` is seven on this CPU (~15 us a call), and the activations
    stay bf16 between a product and what uses it. The norm's epsilon is left out; it only drafts.
    A draft step of SmolLM2 at one row (4-bit layers): 7.8 -> 7.1 ms; its greedy pick agreed with
    the fp32 model's on 752 of 768 tokens (751 with the norms whole)."""

    def __init__(self, layer: FusedLlamaLayer, convert):
        super().__init__(
            None,
            None,
            convert(layer.qkv),
            convert(layer.o_proj),
            convert(layer.gate_up),
            convert(layer.down_proj),
            heads=layer.heads,
            kv_heads=layer.kv_heads,
            head_dim=layer.head_dim,
            scaling=layer.scaling,
        )
        width = layer.qkv.in_features
        self.register_buffer("input_scale", layer.input_norm.weight.detach() * width**0.5)
        self.register_buffer("post_attention_scale", layer.post_attention_norm.weight.detach() * width**0.5)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache,
        index: int,
        shared_head: int,
    ) -> torch.Tensor:
        qkv = self.qkv.low(hidden * self.input_scale) / torch.linalg.vector_norm(hidden, dim=-1, keepdim=True)
        hidden = hidden + self.o_proj.low(self.attend(qkv, cos, sin, mask, cache, index, shared_head))
        norm = torch.linalg.vector_norm(hidden, dim=-1, keepdim=True).to(torch.bfloat16)
        gate, up = self.gate_up.low(hidden * self.post_attention_scale).div_(norm).chunk(2, dim=-1)
        return hidden + self.down_proj.low(F.silu(gate) * up)


class FusedLlama(torch.nn.Module):
    """A Llama causal LM's inference forward with fused products (see the module's docstring).
    Called like the model (input ids, 2-D attention mask, positions, a KV cache, `logits_to_keep`,
    `shared_head`); returns an output whose `.logits` are the model's."""

    def __init__(self, config, generation_config, embed_tokens, rotary_emb, layers, norm, lm_head):
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.embed_tokens, self.rotary_emb, self.norm = embed_tokens, rotary_emb, norm
        self.layers, self.lm_head = torch.nn.ModuleList(layers), lm_head
        self.eval()

    @classmethod
    def of(cls, model) -> FusedLlama:
        """The fused form of a transformers Llama causal LM (which gives up its separate projections)."""
        if not fusable(model):
            raise ValueError(f"{type(model).__name__} is not a Llama model FusedLlama can run")
        inner = model.model
        return cls(
            model.config,
            model.generation_config,
            inner.embed_tokens,
            inner.rotary_emb,
            [FusedLlamaLayer.of(layer, model.config) for layer in inner.layers],
            inner.norm,
            model.lm_head,
        )

    def draft(self, convert, head) -> FusedLlama:
        """A draft of this model: the same embeddings, rotary embedding and final norm (shared), and
        `DraftLlamaLayer`s whose products are `convert(linear)`, the LM head `head(linear)`. Build it
        from the fp32 `nn.Linear`s, before `use_onednn_linears` packs them."""
        return FusedLlama(
            self.config,
            self.generation_config,
            self.embed_tokens,
            self.rotary_emb,
            [DraftLlamaLayer(layer, convert) for layer in self.layers],
            self.norm,
            head(self.lm_head),
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values=None,
        logits_to_keep: int = 0,
        shared_head: int = 0,
        **_,
    ) -> CausalLMOutputWithPast:
        rows, length = input_ids.shape
        past = past_key_values.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=input_ids.device)[None].expand(rows, -1)
        hidden = self.embed_tokens(input_ids)
        cos, sin = (part.unsqueeze(1) for part in self.rotary_emb(hidden, position_ids))  # broadcast over heads
        mask = attention_mask_4d(attention_mask, past, length)
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, cos, sin, mask, past_key_values, index, shared_head)
        if logits_to_keep:  # the norm is per position: only the positions whose logits are wanted
            hidden = hidden[:, -logits_to_keep:]
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm.weight, self.norm.variance_epsilon)
        return CausalLMOutputWithPast(logits=self.lm_head(hidden), past_key_values=past_key_values)


def attention_mask_4d(mask: torch.Tensor | None, past: int, length: int) -> torch.Tensor | None:
    """The boolean mask (True: attend) of `length` new queries over `past` cached keys and their
    own, from the 2-D mask of the engine (0: padding); None where causal attention needs none
    (no padding, and one query or no cache). As in transformers' own mask, a padding query may
    have no key at all: torch's attention gives such a row zeros."""
    padded = mask is not None and not bool(mask.all())
    if not padded and (length == 1 or past == 0):
        return None
    keys = torch.arange(past + length, device=mask.device if mask is not None else None)
    queries = keys[past:, None]
    allowed = keys <= queries  # (length, past + length): causal
    if not padded:
        return allowed[None, None]
    return (allowed & mask[:, None, :].bool())[:, None]
