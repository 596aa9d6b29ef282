"""The MiniCPM decoder with μP, and its μP optimizer groups.

A Llama-style decoder (pre-norm RMSNorm, RoPE, SwiGLU, no biases, tied embedding/head, optional
GQA) plus MiniCPM's three scalings (facts §1, arXiv 2404.06395):

    h      = Embedding(ids) * scale_emb
    h      = h + Attn(RMSNorm(h)) * scale_depth / sqrt(L)
    h      = h + MLP(RMSNorm(h))  * scale_depth / sqrt(L)
    logits = lm_head(RMSNorm(h) / (d / d_base))            # μP readout; SP keeps the plain head

Parameter names follow Hugging Face Llama (``embed_tokens``, ``layers.{i}.self_attn.q_proj``,
``mlp.gate_proj``, ``input_layernorm``, ``norm``) and RoPE uses its ``rotate_half`` convention, so
an export to ``LlamaForCausalLM`` is a weight copy (prefix ``model.``, tied ``lm_head``).

    from trainables.model import MiniCPM, build_optimizer
    model = MiniCPM(get_config("micro-128")); opt = build_optimizer(model, lr=1e-2)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainables.shapes import ModelConfig

# --- μP scalings (μP: arXiv 2203.03466 Table 3, Adam column; MiniCPM issues #40, #63) -------


def hidden_init_std(cfg: ModelConfig) -> float:
    """Std of every 2-D hidden weight: init_std / sqrt(d / d_base) under μP, init_std under SP."""
    if cfg.parametrization == "sp":
        return cfg.init_std
    return cfg.init_std / math.sqrt(cfg.width_mult)


def embedding_init_std(cfg: ModelConfig) -> float:
    """init_std (OpenBMB's engine), or width-scaled like the hidden weights when configured."""
    if cfg.parametrization == "mup" and cfg.width_scaled_embedding_init:
        return hidden_init_std(cfg)
    return cfg.init_std


def readout_multiplier(cfg: ModelConfig) -> float:
    """Factor on the final hidden state before the tied head: d_base / d under μP, 1 under SP."""
    return 1.0 if cfg.parametrization == "sp" else 1.0 / cfg.width_mult


def hidden_lr_scale(cfg: ModelConfig) -> float:
    """Adam LR factor of 2-D hidden weights: d_base / d under μP (2.4B: 1/9), 1 under SP."""
    return 1.0 if cfg.parametrization == "sp" else 1.0 / cfg.width_mult


# --- modules --------------------------------------------------------------------------------


def rope_tables(d_head: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, d_head), frequencies concatenated twice (HF Llama's layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head)
    t = torch.arange(max_seq_len, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs) rotated with HF's rotate_half: channel i pairs with i + hs/2."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 statistics as in HF Llama, so bf16 activations normalise the same way
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.d_head = cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        d, kv = cfg.d_model, cfg.n_kv_heads * cfg.d_head
        self.q_proj = nn.Linear(d, cfg.n_heads * cfg.d_head, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.d_head, d, bias=False)

    def _split_heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, n, self.d_head).transpose(1, 2)  # (B, T, n·hs) -> (B, n, T, hs)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Causal self-attention; `mask` (B, 1, T, T) bool, True = may attend, replaces the plain
        causal mask (see `segment_mask`)."""
        B, T, _ = x.shape
        q = self._split_heads(self.q_proj(x), self.n_heads)  # (B, nh, T, hs)
        k = self._split_heads(self.k_proj(x), self.n_kv_heads)  # (B, nkv, T, hs)
        v = self._split_heads(self.v_proj(x), self.n_kv_heads)  # (B, nkv, T, hs)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # default scale 1/sqrt(hs); query head i reads kv head i // (nh / nkv), as HF's repeat_kv
        if mask is not None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
            )
        elif q.device.type == "cpu" and q.dtype == torch.bfloat16:
            y = _CpuBf16Attention.apply(q, k, v)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads
            )  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.d_head))


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: query i may attend to key j iff j <= i and both
    lie in the same segment; the block-diagonal causal mask of packed documents. RoPE scores
    depend only on j − i, so a document packed after others is attended to exactly as alone."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    return (same & causal)[:, None]


class _CpuBf16Attention(torch.autograd.Function):
    """Causal flash attention for bf16 q, k, v on a CPU, computed in float32.

    PyTorch's CPU flash kernels are about 3x slower in bf16 than in fp32 (forward + backward at
    micro shapes), so the kernels run on fp32 copies; autograd keeps what the bf16 kernel keeps
    (bf16 q, k, v and output, fp32 logsumexp), the output in (B, T, nh, hs) memory order as that
    kernel returns it, so the o-projection reads it without a copy.
    """

    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.float(), k.float(), v.float(), 0.0, True
        )
        B, nh, T, hs = out.shape
        y = torch.empty(B, T, nh, hs, dtype=q.dtype).transpose(1, 2).copy_(out)
        ctx.save_for_backward(q, k, v, y, lse)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        q, k, v, y, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_y.float(), q.float(), k.float(), v.float(), y.float(), lse, 0.0, True
        )
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v), strict=True))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)
        # MiniCPM's depth scaling keeps the residual stream's growth independent of L
        self.residual_scale = cfg.scale_depth / math.sqrt(cfg.n_layers)

    def forward(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        s = self.residual_scale  # h + branch · s as one fused op
        h = torch.add(h, self.self_attn(self.input_layernorm(h), cos, sin, mask), alpha=s)
        return torch.add(h, self.mlp(self.post_attention_layernorm(h)), alpha=s)


class MiniCPM(nn.Module):
    """The decoder; ``cfg.parametrization`` picks μP or SP for init and readout."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rope_tables(cfg.d_head, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (T, hs)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """μP/SP init in named_parameters order, so both parametrisations draw the same noise."""
        hidden_std, emb_std = hidden_init_std(self.cfg), embedding_init_std(self.cfg)
        for name, p in self.named_parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # RMSNorm gains
            else:
                p.normal_(0.0, emb_std if name == "embed_tokens.weight" else hidden_std)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx (B, T) -> logits (B, T, V); with targets (B, T) the mean float32 CE in nats/token.

        Targets equal to -100 are ignored (F.cross_entropy's default), for masked SFT losses.
        `segments` (B, T) ints, non-decreasing along a row: a position attends only to earlier
        positions of its own segment (packed documents that do not see each other).
        """
        T = idx.shape[1]
        if self.cfg.max_seq_len < T:
            raise ValueError(f"sequence length {T} > max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        mask = None if segments is None else segment_mask(segments.to(idx.device))
        h = self.embed_tokens(idx) * self.cfg.scale_emb  # (B, T, d)
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        h = self.norm(h) * readout_multiplier(self.cfg)
        if targets is None:
            return F.linear(h, self.embed_tokens.weight)  # (B, T, V), tied head
        return linear_cross_entropy(h.flatten(0, 1), self.embed_tokens.weight, targets.flatten())

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the tied embedding/head (V·d) is counted once, and only if asked."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n


# --- loss: the tied head and cross-entropy in chunks, never the full (B·T, V) logits ---------

# Logits per chunk: 8 MB in fp32 on a CPU, where small chunks stay in cache; 1 GiB on a GPU,
# where every chunk also rewrites the whole (V, d) head gradient, so chunks must be few. At the
# 0.5B shape (V 122,753) on an H200, 2^21-logit chunks (17 rows, ~960 a step) took 89% of the
# step (5.9% MFU); CE_MIN_ROWS alone still leaves 64 chunks a step, 2^28 leaves 8.
CE_CHUNK_LOGITS = 1 << 21
CE_CHUNK_LOGITS_ACCELERATOR = 1 << 28
# Each chunk adds a rank-`rows` update into the (V, d) head gradient: fewer rows than this and
# rewriting that gradient per chunk costs more memory traffic than the whole logits would.
CE_MIN_ROWS = 256
IGNORE_INDEX = -100  # F.cross_entropy's default, for masked SFT losses


def linear_cross_entropy(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over targets != -100 of CE(h @ w.T, targets) in float32 nats, h (N, d), w (V, d).

    The same value as ``F.cross_entropy(F.linear(h, w).float(), targets)`` (the matmul in the
    autocast dtype when autocast is on, the softmax in float32), computed over row chunks of
    about CE_CHUNK_LOGITS logits (CE_CHUNK_LOGITS_ACCELERATOR on a GPU; at least CE_MIN_ROWS
    rows). With gradients, each chunk's gradient is formed at once (d loss / d logits =
    softmax − onehot: the fused linear cross-entropy of Liger-Kernel, arXiv 2410.10989), so the
    logits never outlive their chunk.
    """
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _LinearCrossEntropy.apply(h, w, targets)
    with torch.no_grad():
        return _chunked_ce(h, w, targets, with_grad=False)[0]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def _chunked_ce(h, w, targets, with_grad: bool):
    """(mean loss, unscaled grad_h, unscaled grad_w); the grads are sums over valid rows."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        w_c = w.to(dtype)
        valid = targets != IGNORE_INDEX
        n_valid = valid.sum()
        loss_sum = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if with_grad else None
        grad_w = torch.zeros(w.shape, device=w.device, dtype=torch.float32) if with_grad else None
        budget = CE_CHUNK_LOGITS if h.device.type == "cpu" else CE_CHUNK_LOGITS_ACCELERATOR
        rows = max(CE_MIN_ROWS, budget // w.shape[0])
        for i in range(0, h.shape[0], rows):
            h_c, valid_c = h[i : i + rows].to(dtype), valid[i : i + rows, None]
            tgt = targets[i : i + rows].clamp_min(0)[:, None]  # ignored rows are masked below
            logp = torch.log_softmax(h_c @ w_c.T, dim=-1, dtype=torch.float32)  # (rows, V)
            loss_sum -= (logp.gather(1, tgt) * valid_c).sum()
            if with_grad:
                minus_one = torch.full(tgt.shape, -1.0, device=h.device)
                g = logp.exp_().scatter_add_(1, tgt, minus_one).to(dtype)  # softmax − onehot
                grad_h[i : i + rows] = (g @ w_c).to(h.dtype) * valid_c
                grad_w += g.T @ (h_c * valid_c)  # (V, d), summed in float32 over chunks
    return loss_sum / n_valid, grad_h, grad_w, n_valid


class _LinearCrossEntropy(torch.autograd.Function):
    """Gradients are formed in forward (the loss is a scalar): backward only scales them."""

    @staticmethod
    def forward(ctx, h, w, targets):
        loss, grad_h, grad_w, n_valid = _chunked_ce(h, w, targets, with_grad=True)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        ctx.w_dtype = w.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid  # d mean / d sum
        return grad_h * scale.to(grad_h.dtype), (grad_w * scale).to(ctx.w_dtype), None


# --- optimizer ------------------------------------------------------------------------------


def param_groups(model: MiniCPM, weight_decay: float = 0.1) -> list[dict]:
    """μP Adam groups: hidden 2-D weights at lr·d_base/d with decay, embedding at lr with decay,
    norm gains at lr without decay (facts §1). Under SP every lr_scale is 1.

    The trainer sets ``group["lr"] = lr_t * group["lr_scale"]`` each step (see ``set_lr``).
    """
    hidden, embedding, norms = [], [], []
    for name, p in model.named_parameters():
        if name == "embed_tokens.weight":
            embedding.append(p)
        elif p.ndim == 1:
            norms.append(p)
        else:
            hidden.append(p)
    wd, mup_scale = weight_decay, hidden_lr_scale(model.cfg)
    return [
        {"name": "hidden", "params": hidden, "lr_scale": mup_scale, "weight_decay": wd},
        {"name": "embedding", "params": embedding, "lr_scale": 1.0, "weight_decay": wd},
        {"name": "norm", "params": norms, "lr_scale": 1.0, "weight_decay": 0.0},
    ]


def build_optimizer(
    model: MiniCPM,
    lr: float,
    *,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 0.1,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``param_groups`` (β, ε, wd of OpenBMB's engine), each group at lr·lr_scale.

    AdamW's decay is multiplied by the group's lr, so μP's smaller hidden lr also shrinks their
    per-step decay, as in OpenBMB's engine.
    """
    groups = param_groups(model, weight_decay)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply a scheduled base lr to every group through its μP lr_scale."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g["lr_scale"]
