"""Faster CPU inference for the embedded engine: oneDNN linear layers, attention without K/V copies.

PyTorch's CPU wheels send `nn.Linear` to MKL's sgemm, which on this AMD EPYC runs far below
the machine: 8 GFLOP/s for one row (a decoding step), 51 for eight, 220 for a prompt. The
oneDNN library inside the same wheel does 18, 135 and 480 on the same shapes, in fp32 with
the same inputs; results differ from MKL's only by summation order (about 1e-5 relative).
So for inference the engine hands every linear layer to oneDNN with its weight reordered
once into oneDNN's blocked layout. Training does the same through an autograd-aware layer,
`OneDNNTrainingLinear`, whose backward products run through oneDNN too.

Attention: models with grouped-query attention (SmolLM2: 9 query heads share 3 key/value
heads) get their keys and values copied once per query head by transformers' SDPA path
whenever a mask is passed, and the engine always passes one (padding, cached prefixes). At
8 rows and 1,070 cached tokens that copy is 2.9 ms a layer, 87 ms a decoding step; SDPA's
own grouped-query mode reads the shared heads in place: 0.5 ms, and bit-identical output.

KV cache: transformers' `DynamicCache` appends each step's keys and values with `torch.cat`,
copying the whole cache every step: 19 ms a step at 8 rows and 1,070 tokens, as much as all
the linear layers. `GrowingCache` keeps them in a buffer with room to spare and writes the new
ones in place.

Threads: torch's CPU parallelism is OpenMP (libgomp), which keeps a pool of worker threads for
every thread that starts parallel work, and once a process holds more pool threads than CPUs it
stops spinning between parallel regions and puts its workers to sleep. Waking them costs ~45 us
a region on this VM, and a decoding step is ~200 regions: a step that takes 21 ms on the thread
that loaded the model took 30 ms on an engine's worker thread. So all of a process's torch work
(the engines' loading, prefill and decoding; fine-tuning; model conversion) runs on one thread,
`on_torch_thread`.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch
from transformers import AttentionInterface, AttentionMaskInterface, DynamicCache
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import sdpa_mask

GQA_SDPA = "misstep_sdpa_gqa"

_TORCH_THREAD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="misstep-torch")


def on_torch_thread(function, *args, **kwargs):
    """`function(*args, **kwargs)`, run on the process's one torch thread (waiting for it)."""
    if threading.current_thread().name.startswith("misstep-torch"):  # already there: run inline
        return function(*args, **kwargs)
    return _TORCH_THREAD.submit(function, *args, **kwargs).result()


class _StoredLinear(torch.nn.Module):
    """An inference-only stand-in for an `nn.Linear` whose weight a subclass stores in a layout or
    precision of its own: the shape and the bias, kept here."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class OneDNNLinear(_StoredLinear):
    """An inference-only `nn.Linear` whose weight lives in oneDNN's packed layout."""

    def __init__(self, linear: torch.nn.Linear, batch_hint: int = 8):
        super().__init__(linear)
        # `batch_hint` is the row count the layout is tuned for; any row count works.
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), batch_size=batch_hint)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class _DraftLinear(_StoredLinear):
    """A linear layer whose weight is stored in fewer bits, for the engine's draft model only: bf16
    activations into one of torch's CPU low-bit products, fp32 out. Not the model's numbers: the
    engine uses it only to draft tokens that the fp32 model then checks."""

    precision = 0.0  # the largest error expected, as a share of the output's largest value

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.low(x).float()

    def low(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output in bf16 (with a bias: in the bias's dtype), for a caller that does not
        need fp32: one conversion fewer."""
        out = self.product(x.reshape(-1, self.in_features).to(torch.bfloat16)).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias

    @classmethod
    @torch.no_grad()
    def available(cls) -> bool:
        """Whether this torch has the product on CPU, and it computes what it should (to its
        precision) on a random layer."""
        try:
            check = torch.Generator().manual_seed(0)
            linear = torch.nn.Linear(64, 32)
            linear.weight.copy_(torch.randn(32, 64, generator=check))
            probe = torch.randn(3, 64, generator=check)
            expected = linear(probe)
            return bool((cls(linear)(probe) - expected).abs().max() <= cls.precision * expected.abs().max())
        except (AttributeError, RuntimeError, NotImplementedError):
            return False


class Int8Linear(_DraftLinear):
    """int8 weights, one scale per output: a quarter of the fp32 weight's bytes. torch's CPU kernel
    for it runs all of SmolLM2's products at one row in 5.0 ms against oneDNN fp32's 9.6."""

    precision = 0.03

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(torch.bfloat16))

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)


class Int4Linear(_DraftLinear):
    """4-bit weights in groups of `group` inputs, each group with its own scale and offset: an eighth
    of the fp32 weight's bytes. A decoding step streams its weights from memory, and torch's CPU
    int4 kernel reads them faster than the int8 one: one SmolLM2 layer's products at one row take
    85 us against int8's 145 (cold weights, 2 threads)."""

    precision = 0.15

    def __init__(self, linear: torch.nn.Linear, group: int = 32):
        super().__init__(linear)
        if not self.fits(linear, group):
            raise ValueError(f"{self.in_features} inputs do not split into groups of {group}")
        self.group = group
        weight = linear.weight.detach().float().view(self.out_features, -1, group)
        low, high = weight.amin(dim=-1, keepdim=True), weight.amax(dim=-1, keepdim=True)
        scales = ((high - low) / 15).clamp(min=1e-8)
        codes = torch.round((weight - low) / scales).clamp(0, 15).to(torch.int32).view(self.out_features, -1)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # The kernel computes (code - 8) * scale + offset: so offset = low + 8 * scale.
        offsets = low + 8 * scales
        self.register_buffer(
            "scales_offsets",
            torch.stack([scales.squeeze(-1), offsets.squeeze(-1)], dim=-1)
            .transpose(0, 1)
            .contiguous()
            .to(torch.bfloat16),
        )

    @staticmethod
    def fits(linear: torch.nn.Linear, group: int = 32) -> bool:
        return linear.in_features % group == 0

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, self.group, self.scales_offsets)


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear ops (CPU builds normally do)."""
    try:
        return (
            torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        )
    except (AttributeError, RuntimeError):
        return False


@torch.no_grad()
def use_onednn_linears(model: torch.nn.Module, batch_hint: int = 8) -> int:
    """Replace every fp32 `nn.Linear` of a CPU model by a `OneDNNLinear` (in place); the count replaced.

    Each replacement is checked against the layer it replaces on a random input, so a torch whose
    private oneDNN ops behave differently keeps the plain layer rather than computing wrong answers.
    A weight shared with another module (tied input embeddings) stays where it is; the packed copy
    is the linear layer's own."""
    if not onednn_available():
        return 0
    replaced = 0
    check = torch.Generator().manual_seed(0)  # its own: loading a model must not move the global RNG
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                type(child) is not torch.nn.Linear
                or child.weight.dtype != torch.float32
                or child.weight.device.type != "cpu"
            ):
                continue
            try:
                fast = OneDNNLinear(child, batch_hint)
                probe = torch.randn(3, child.in_features, generator=check)
                ok = torch.allclose(fast(probe), child(probe), rtol=1e-4, atol=1e-4)
            except RuntimeError:
                ok = False
            if ok:
                setattr(parent, name, fast)
                replaced += 1
    return replaced


def sdpa_gqa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    shared_head: int = 0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, except that shared key/value heads are never copied,
    and that keys every row shares (`shared_head`, passed through the model's call) are read once."""
    is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
    groups = getattr(module, "num_key_value_groups", 1)
    if shared_head and query.shape[0] > 1 and (attention_mask is not None or query.shape[2] == 1):
        output = _attention_with_shared_head(query, key, value, attention_mask, scaling, shared_head, groups)
    else:
        output = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=bool(query.shape[2] > 1 and attention_mask is None and is_causal),
            enable_gqa=groups > 1,
        )
    return output.transpose(1, 2).contiguous(), None


def _attention_with_shared_head(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    shared: int,
    groups: int,
) -> torch.Tensor:
    """Attention when the first `shared` keys are the same in every row (the cached prompt head a
    batch starts from): the queries of all rows attend to one copy of the head at once, each row's
    to the rest of its own keys, and the two parts are merged by their log-sum-exps. Decoding 8
    recover prompts, the 697-token head was most of what attention read, once per row."""
    attend = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    # Query head h uses key/value head h // groups: group a key/value head's queries as its rows.
    grouped = query.reshape(rows, kv_heads, groups * length, dim)
    everyone = grouped.transpose(0, 1).reshape(1, kv_heads, rows * groups * length, dim)
    head_out, head_lse = attend(everyone, key[:1, :, :shared], value[:1, :, :shared], 0.0, False, scale=scale)
    head_out = head_out.reshape(kv_heads, rows, groups * length, dim).transpose(0, 1)
    head_lse = head_lse.reshape(kv_heads, rows, groups * length).transpose(0, 1)
    own_mask = None
    if mask is not None:  # boolean (True: attend) over all keys -> additive over the row's own keys
        own = mask[..., shared:].repeat(1, 1, groups, 1)
        own_mask = torch.zeros(own.shape, dtype=query.dtype).masked_fill_(~own, float("-inf"))
    own_out, own_lse = attend(
        grouped, key[:, :, shared:], value[:, :, shared:], 0.0, False, attn_mask=own_mask, scale=scale
    )
    top = torch.maximum(head_lse, own_lse)
    head_weight, own_weight = (head_lse - top).exp_().unsqueeze(-1), (own_lse - top).exp_().unsqueeze(-1)
    output = (head_out * head_weight + own_out * own_weight) / (head_weight + own_weight)
    return output.reshape(rows, heads, length, dim)


AttentionInterface.register(GQA_SDPA, sdpa_gqa_attention)
AttentionMaskInterface.register(GQA_SDPA, sdpa_mask)


def use_gqa_attention(model) -> bool:
    """Switch a model that uses transformers' SDPA attention to `sdpa_gqa_attention`; whether it did."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        return False
    model.set_attn_implementation(GQA_SDPA)
    return True


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a larger buffer, so appending writes in
    place. Cropping keeps the views; selecting or repeating rows makes new tensors (DynamicLayer's own
    code), which the next update moves into a fresh buffer: once per change of the batch."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.key_buffer = self.value_buffer = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start = self.get_seq_length()
        end = start + key_states.shape[-2]
        in_buffer = (
            self.key_buffer is not None
            and self.keys.data_ptr() == self.key_buffer.data_ptr()
            and self.keys.shape[0] == self.key_buffer.shape[0]
            and end <= self.key_buffer.shape[-2]
        )
        if not in_buffer:  # new, reshaped or full: move into a buffer with half as much room again
            shape = (*key_states.shape[:-2], end + max(256, end // 2), key_states.shape[-1])
            self.key_buffer = key_states.new_empty(shape)
            self.value_buffer = value_states.new_empty(shape[:-1] + (value_states.shape[-1],))
            if start:
                self.key_buffer[..., :start, :] = self.keys
                self.value_buffer[..., :start, :] = self.values
        self.key_buffer[..., start:end, :] = key_states
        self.value_buffer[..., start:end, :] = value_states
        self.keys, self.values = self.key_buffer[..., :end, :], self.value_buffer[..., :end, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A `DynamicCache` of `GrowingLayer`s: the same interface, no copy of the cache per step."""

    def __init__(self):
        Cache.__init__(self, layer_class_to_replicate=GrowingLayer)


# -- training: forward and backward products through oneDNN ------------------------------------


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), computed by oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` whose forward and backward products run through oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])  # (tokens, out)
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:  # (tokens, out) @ (out, in)
            grad_x = _onednn_linear(rows, weight.t().contiguous()).reshape(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:  # (out, tokens) @ (tokens, in)
            grad_weight = _onednn_linear(rows.t().contiguous(), x.reshape(-1, x.shape[-1]).t().contiguous())
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = rows.sum(0)
        return grad_x, grad_weight, grad_bias


class OneDNNTrainingLinear(torch.nn.Linear):
    """An `nn.Linear` whose fp32 CPU products, forward and backward, run through oneDNN instead of
    MKL. PyTorch's CPU wheels send fp32 products to MKL, which on this AMD EPYC reaches 219 GFLOP/s
    on a 2048^3 product where oneDNN, in the same wheel, reaches 474 (benchmarks/training.py).
    Results differ from MKL's by summation order only. Still an `nn.Linear` (peft wraps it, the
    state dict is the same); gradient checkpointing recomputes through it too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32:
            return _OneDNNLinear.apply(x, self.weight, self.bias)
        return super().forward(x)


def train_linears_through_onednn(model: torch.nn.Module) -> int:
    """Make every `nn.Linear` of `model` (LoRA's included, once peft has added them) a
    `OneDNNTrainingLinear`, in place: same parameters, same names. The number changed."""
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    for module in linears:
        module.__class__ = OneDNNTrainingLinear  # the same object, parameters and hooks: only forward changes
    return len(linears)
