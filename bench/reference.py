"""The MiniCPM decoder and its training step written the obvious way: the speed baseline.

Same architecture, parameter names and μP constants as `trainables.model.MiniCPM`, so the
trainer's weights load into it and both give the same loss; but everything is spelled out in
eager PyTorch with no tricks: RMSNorm from mean-of-squares, attention as a masked softmax over
the full (T, T) score matrix, the full (B, T, V) logits into `F.cross_entropy`, `torch.optim.AdamW`
with its default implementation, `loss.item()` every step. `bench/throughput.py` times it beside
the trainer in the same process.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainables.shapes import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, dh = cfg.d_model, cfg.d_head
        self.q_proj = nn.Linear(d, cfg.n_heads * dh, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_heads * dh, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_heads * dh, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * dh, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        c = self.cfg
        q = self.q_proj(x).view(B, T, c.n_heads, c.d_head).transpose(1, 2)
        k = self.k_proj(x).view(B, T, c.n_kv_heads, c.d_head).transpose(1, 2)
        v = self.v_proj(x).view(B, T, c.n_kv_heads, c.d_head).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k = k.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)
        v = v.repeat_interleave(c.n_heads // c.n_kv_heads, dim=1)
        scores = q @ k.transpose(-2, -1) / math.sqrt(c.d_head)  # (B, nh, T, T)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
        y = scores.softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, T, c.n_heads * c.d_head))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = nn.Module()
        self.mlp.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.mlp.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.mlp.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.scale = cfg.scale_depth / math.sqrt(cfg.n_layers)

    def forward(self, h, cos, sin):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin) * self.scale
        x = self.post_attention_layernorm(h)
        m = self.mlp
        return h + m.down_proj(F.silu(m.gate_proj(x)) * m.up_proj(x)) * self.scale


class ReferenceMiniCPM(nn.Module):
    """Load a `MiniCPM` state_dict into it (`load_state_dict`, strict) to compare the two."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.d_head, 2).float() / cfg.d_head)
        freqs = torch.outer(torch.arange(cfg.max_seq_len).float(), inv)
        self.cos, self.sin = (
            torch.cat((freqs, freqs), -1).cos(),
            torch.cat((freqs, freqs), -1).sin(),
        )

    def forward(self, idx, targets):
        T = idx.shape[1]
        h = self.embed_tokens(idx) * self.cfg.scale_emb
        for layer in self.layers:
            h = layer(h, self.cos[:T], self.sin[:T])
        d_ratio = self.cfg.d_model / self.cfg.dim_model_base
        if self.cfg.parametrization == "sp":
            d_ratio = 1.0
        logits = self.norm(h) / d_ratio @ self.embed_tokens.weight.T  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))


def reference_optimizer(model: ReferenceMiniCPM, lr: float) -> torch.optim.AdamW:
    """μP groups as a list of dicts, torch's default AdamW implementation."""
    mup = 1.0 if model.cfg.parametrization == "sp" else model.cfg.dim_model_base / model.cfg.d_model
    named = list(model.named_parameters())
    emb = [p for n, p in named if n == "embed_tokens.weight"]
    norms = [p for n, p in named if p.ndim == 1]
    hidden = [p for n, p in named if p.ndim == 2 and n != "embed_tokens.weight"]
    groups = [
        {"params": hidden, "lr": lr * mup, "weight_decay": 0.1},
        {"params": emb, "lr": lr, "weight_decay": 0.1},
        {"params": norms, "lr": lr, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def reference_step(model, opt, x, y, amp: torch.dtype | None) -> float:
    """One training step the obvious way; returns the loss as a Python float."""
    with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
        loss = model(x, y)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return loss.item()
