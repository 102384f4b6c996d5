"""The Qwen2 / Llama decoder written as plain layers over a paged KV cache.

Parameter names follow Hugging Face's (``model.layers.0.self_attn.o_proj.weight``...), except that q/k/v
and gate/up are fused into one matmul each (``qkv_proj``, ``gate_up_proj``); ``PACKED`` says where each
HF weight goes, and ``load_weights`` in engine.py applies it. Tokens are flat (``[N]``, all sequences of a
step concatenated); attention gathers each sequence's keys and values from the block cache through
``AttentionInputs`` built by the model runner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    """The architecture fields of an HF ``config.json`` that this engine uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # bias on the q/k/v projections (Qwen2: always; Llama: config.attention_bias)
    o_bias: bool  # bias on the output projection (Llama: config.attention_bias; Qwen2: never)
    mlp_bias: bool  # bias on the MLP projections (Llama: config.mlp_bias)

    @classmethod
    def from_hf(cls, cfg: dict) -> "ModelArgs":
        arch = (cfg.get("architectures") or [ARCHITECTURES.get(cfg.get("model_type"), cfg.get("model_type"))])[0]
        if arch not in ARCHITECTURES.values():
            raise ValueError(f"unsupported architecture {arch!r}; supported: {', '.join(ARCHITECTURES.values())}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}; supported: silu")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (theta included); older checkpoints `rope_theta` + `rope_scaling`
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope or None,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            qkv_bias=arch == "Qwen2ForCausalLM" or cfg.get("attention_bias", False),
            o_bias=arch != "Qwen2ForCausalLM" and cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
        )


@dataclass
class AttentionInputs:
    """Where a step's tokens go in the KV cache and what each query may attend to.

    slot_blocks, slot_offsets [N]: the cache block and the offset in it of each new token.
    block_tables [B, M]: each sequence's KV blocks in position order (padded with any valid block).
    Prefill steps:
      query_index [B, Q]: flat token index of each sequence's queries, -1 where padded.
      mask [B, Q, M * block_size] float: 0 where the query may attend to the key (causal, within the
        context), -inf elsewhere; padded queries attend to key 0 only.
    Decode steps (one query per sequence, token b belongs to sequence b; query_index and mask are None):
      context_lens [B]: tokens each query attends to (its own included).
      max_context: an upper bound on context_lens (a Python int; sizes the paged kernel's launch).
    """

    slot_blocks: torch.Tensor
    slot_offsets: torch.Tensor
    block_tables: torch.Tensor
    query_index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    max_context: int = 0


# HF weight name part -> (our fused parameter name part, shard index); shard sizes come from ModelArgs.
PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


def shard_sizes(args: ModelArgs, fused: str) -> list[int]:
    """Row sizes of the shards of a fused projection, in shard-index order."""
    if fused == "qkv_proj":
        return [args.num_heads * args.head_dim] + [args.num_kv_heads * args.head_dim] * 2
    return [args.intermediate_size] * 2


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim / 2], with the scaling variants of Qwen2.5 / Llama 3.x."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        ramped = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        middle = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(middle, ramped, out)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: {', '.join(ROPE_TYPES)}")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.kernel = None  # fused_ops.rms_norm on GPUs (see CausalLM.use_kernels)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """The normalised x; with `residual`, (the normalised x + residual, x + residual)."""
        if self.kernel is not None:
            return self.kernel(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in float32, rounded to the input dtype, then scaled: the order transformers uses
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, D]; cos/sin [N, 1, D] (halves repeated). Rotates (x1, x2) pairs split at D / 2."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.qkv_bias
        self.q_size, self.kv_size = args.num_heads * args.head_dim, args.num_kv_heads * args.head_dim
        self.qkv_proj = nn.Linear(args.hidden_size, self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)
        # [num_blocks, H_kv, block_size, D] views of this layer's cache, set by the model runner
        self.k_cache = self.v_cache = torch.empty(0)
        self.decode_kernel = self.rope_store_kernel = None  # Triton kernels on GPUs (see CausalLM.use_kernels)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        n, h_kv, group, d = x.shape[0], self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)
        if self.rope_store_kernel is not None:  # rotation and cache store in one kernel
            q = self.rope_store_kernel(qkv.view(n, -1, d), cos, sin, self.num_heads, self.k_cache, self.v_cache,
                                       attn.slot_blocks, attn.slot_offsets)
        else:
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(n, -1, d), cos, sin)  # one rotation for both
            q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
            v = qkv[:, self.q_size + self.kv_size :].view(n, h_kv, d)
            self.k_cache[attn.slot_blocks, :, attn.slot_offsets] = k.to(self.k_cache.dtype)
            self.v_cache[attn.slot_blocks, :, attn.slot_offsets] = v.to(self.v_cache.dtype)
        if attn.query_index is None and self.decode_kernel is not None:  # decode, blocks read in place
            out = self.decode_kernel(q.reshape(n, -1, d), self.k_cache, self.v_cache, attn.block_tables,
                                     attn.context_lens, attn.max_context)
            return self.o_proj(out.reshape(n, -1))
        b, m = attn.block_tables.shape  # each sequence's blocks, gathered whole: [B, M, H_kv, block_size, D]
        keys = self.k_cache.index_select(0, attn.block_tables.reshape(-1)).view(b, m, *self.k_cache.shape[1:])
        values = self.v_cache.index_select(0, attn.block_tables.reshape(-1)).view(b, m, *self.v_cache.shape[1:])
        # GQA without repeating keys: the G query heads that share a KV head become G query rows
        if attn.query_index is None:  # decode: one query per sequence
            out = decode_attention(q.view(n, h_kv, group, d), keys, values, attn.context_lens)
            return self.o_proj(out.reshape(n, -1))
        width = attn.query_index.shape[1]  # prefill: [B, Q, H, D] -> [B, H_kv, G * Q, D]
        queries = q[attn.query_index].view(b, width, h_kv, group, d).permute(0, 2, 3, 1, 4).reshape(b, h_kv, -1, d)
        keys, values = (t.permute(0, 2, 1, 3, 4).reshape(b, h_kv, -1, d) for t in (keys, values))
        mask = attn.mask.repeat(1, group, 1)[:, None]  # [B, 1, G * Q, K]
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
        out = out.view(b, h_kv, group, width, d).permute(0, 3, 1, 2, 4).reshape(b, width, -1)
        flat = torch.empty(n, out.shape[-1], dtype=out.dtype, device=out.device)  # back to flat tokens
        valid = attn.query_index >= 0
        flat[attn.query_index[valid]] = out[valid]
        return self.o_proj(flat)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
    """One query row per (sequence, head): q [B, H_kv, G, D]; k, v [B, M, H_kv, block_size, D] (each
    sequence's blocks in order); sequence b attends to its first context_lens[b] keys -> [B, H_kv, G, D].
    Scores are taken block by block, so the gathered keys are never permuted into one contiguous context
    (softmax in float32)."""
    b, m, h_kv, bs, d = k.shape
    scores = torch.matmul(q[:, None], k.transpose(-1, -2))  # [B, M, H_kv, G, block_size]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(b, h_kv, -1, m * bs)
    probs = _context_softmax(scores, d**-0.5, context_lens, v.dtype)
    probs = probs.view(b, h_kv, -1, m, bs).permute(0, 3, 1, 2, 4)  # [B, M, H_kv, G, block_size]
    return torch.matmul(probs, v).sum(1)  # [B, M, H_kv, G, D] summed over blocks


def _context_softmax(scores: torch.Tensor, scale: float, context_lens: torch.Tensor,
                     dtype: torch.dtype) -> torch.Tensor:
    """Softmax (in float32, then cast to `dtype`) of scores [B, H_kv, G, K] times `scale` over each sequence's
    first context_lens[b] keys; the scores are scaled and masked in place."""
    beyond = torch.arange(scores.shape[-1], device=scores.device)[None, :] >= context_lens[:, None]  # [B, K]
    scores.mul_(scale).masked_fill_(beyond[:, None, None], float("-inf"))
    return scores.softmax(-1, dtype=torch.float32).to(dtype)


def paged_decode_attention_torch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 block_tables: torch.Tensor, context_lens: torch.Tensor,
                                 max_context: int = 0) -> torch.Tensor:
    """`decode_attention` written as block lookups and sums instead of a gathered copy and matmuls, for
    torch.compile: inductor fuses the lookup into the score and weighted-sum loops, so keys and values are
    read in place (on CPU about 2x faster than the compiled gather + matmul form; slower eagerly). The
    paged Triton kernel's signature: q [B, H, D], caches [blocks, H_kv, block_size, D], block_tables [B, M]
    -> [B, H, D]."""
    b, m = block_tables.shape
    h_kv, bs, d = k_cache.shape[1:]
    g = q.shape[1] // h_kv
    scores = (q.view(b, 1, h_kv, g, 1, d) * k_cache[block_tables][:, :, :, None]).sum(-1)  # [B, M, H_kv, G, bs]
    scores = scores.permute(0, 2, 3, 1, 4).reshape(b, h_kv, g, m * bs)
    probs = _context_softmax(scores, d**-0.5, context_lens, v_cache.dtype)
    probs = probs.view(b, h_kv, g, m, bs).permute(0, 3, 1, 2, 4)  # [B, M, H_kv, G, bs]
    return (probs[..., None] * v_cache[block_tables][:, :, :, None]).sum((1, 4)).view(b, -1, d)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        bias = args.mlp_bias
        self.gate_up_proj = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=bias)
        self.kernel = None  # fused_ops.silu_mul on GPUs (see CausalLM.use_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.kernel is not None:
            return self.down_proj(self.kernel(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, residual, cos, sin, attn: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it); the caller adds the two (the next
        layer's norm does, in one kernel on GPUs). `residual` is None for the first layer."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(x, cos, sin, attn), residual)
        return self.mlp(x), residual


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args) for _ in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class CausalLM(nn.Module):
    """``forward(input_ids [N], positions [N], attn) -> hidden [N, hidden]``; ``logits(hidden) -> [.., V]``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        self.init_rope(args.max_position_embeddings)

    def init_rope(self, max_positions: int) -> None:
        """The rotary table `rope_cache` [max_positions, head_dim]: cos then sin of position * inverse
        frequency (computed in float32, as the trainer does, then stored in the weights' dtype). A decode
        step looks its positions up instead of evaluating cos and sin (which inductor would otherwise
        recompute for every key the rotated query meets)."""
        weight = self.model.embed_tokens.weight
        inv_freq = rope_inv_freq(self.args).to(weight.device)
        freqs = torch.arange(max_positions, device=weight.device).float()[:, None] * inv_freq[None, :]
        table = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(weight.dtype)
        self.register_buffer("rope_cache", table, persistent=False)

    def tie_weights(self) -> None:
        """Shares the embedding with the output head when the config ties them (again after `to_empty`)."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionInputs) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope_cache[positions].to(x.dtype)[:, None].chunk(2, dim=-1)
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)  # [N, 1, D], halves repeated
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, cos, sin, attn)
        return self.model.norm(x, residual)[0]

    def use_kernels(self, decode_attention=None, rms_norm=None, silu_mul=None, rope_store=None) -> None:
        """Routes decode attention and the elementwise steps through these kernels (paged_attention,
        fused_ops); None keeps the PyTorch code."""
        for module in self.modules():
            if isinstance(module, Attention):
                module.decode_kernel, module.rope_store_kernel = decode_attention, rope_store
            elif isinstance(module, RMSNorm):
                module.kernel = rms_norm
            elif isinstance(module, MLP):
                module.kernel = silu_mul

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
