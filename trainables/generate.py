"""Sampling from any stage's model: greedy or temperature / top-k / top-p, with a KV cache.

``MiniCPM.forward`` recomputes the whole prefix. Decoding here reuses the model's own modules
(embedding, norms, q/k/v/o projections, MLP, RoPE tables) in a cached forward that keeps each
layer's rotated keys and values, so a new token costs one position instead of the whole prefix.
It computes what the full forward computes, position by position (tested to 1e-5), and works on
any model with MiniCPM's module layout, e.g. one whose nn.Linear layers are GPTQ QuantLinears.

The model conditions on at most its last ``max_seq_len`` tokens (a sliding window). While the
text fits, the cache grows by one position per token; once it is longer, every step re-encodes
the window at positions 0..max_seq_len-1, exactly as the uncached path does, because RoPE and
the hidden states of the window depend on where it starts.

    text = generate(model, tokenizer, "def main():", max_new_tokens=64, temperature=0.8)
    ids = generate_ids(model, [17, 4, 99], max_new_tokens=8, temperature=0.0)  # greedy
    text = generate_from_dir("runs/x/sft/model", "Hi", chat=True)

    python -m trainables.generate runs/x/sft/model "Hi" --chat --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainables.model import apply_rope, readout_multiplier
from trainables.tokenizer import Tokenizer

# --- choosing the next token (pure functions) ---------------------------------------------------


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy (argmax); top_k keeps the k likeliest tokens, top_p the nucleus."""

    temperature: float = 0.8
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
            raise ValueError(f"Sampling.temperature={t!r}: must be a finite number >= 0")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"Sampling.top_k={k!r}: must be None or an integer >= 1")
        p = self.top_p
        if p is not None and (
            isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1
        ):
            raise ValueError(f"Sampling.top_p={p!r}: must be None or a number in (0, 1]")


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """logits (V,) with all but the k largest set to -inf (ties at the k-th value are kept)."""
    if k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, -math.inf)


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al., arXiv 1904.09751): keep the smallest set of likeliest
    tokens whose probability sums to at least p; the likeliest token is always kept."""
    sorted_logits, order = torch.sort(logits, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs >= p  # the likelier tokens before this one already reach p
    return logits.masked_fill(drop.scatter(0, order, drop), -math.inf)


def next_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """One id from logits (V,): argmax at temperature 0, else temperature, top-k, top-p (the
    order of HF's logits warpers), then one draw from `generator`."""
    if sampling.temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / sampling.temperature
    if sampling.top_k is not None:
        logits = filter_top_k(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = filter_top_p(logits, sampling.top_p)
    return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


# --- the cached forward -------------------------------------------------------------------------


class KVCache:
    """Rotated keys and values (1, n_kv, max_seq_len, d_head) of every layer, filled to `length`."""

    def __init__(self, n_layers: int, max_seq_len: int):
        self.max_seq_len = max_seq_len
        self.length = 0
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    def extend(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (1, n_kv, T, hs) at positions length..length+T; return all keys, values."""
        if self._k[layer] is None:  # allocated on first use, in the activations' dtype
            shape = (*k.shape[:2], self.max_seq_len, k.shape[-1])
            self._k[layer] = k.new_empty(shape)
            self._v[layer] = v.new_empty(shape)
        end = self.length + k.shape[2]
        self._k[layer][:, :, self.length : end] = k
        self._v[layer][:, :, self.length : end] = v
        return self._k[layer][:, :, :end], self._v[layer][:, :, :end]


_MODEL_PARTS = ("cfg", "embed_tokens", "norm", "rope_cos", "rope_sin")
_BLOCK_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp", "residual_scale")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "n_heads", "n_kv_heads", "d_head")


def supports_cache(model: nn.Module) -> bool:
    """True when `model` has MiniCPM's module layout, which the cached forward calls into."""
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(model, a) for a in _MODEL_PARTS):
        return False
    return all(
        all(hasattr(layer, a) for a in _BLOCK_PARTS)
        and all(hasattr(layer.self_attn, a) for a in _ATTENTION_PARTS)
        for layer in layers
    )


def _heads(x: torch.Tensor, n: int, d_head: int) -> torch.Tensor:
    B, T, _ = x.shape
    return x.view(B, T, n, d_head).transpose(1, 2)  # (B, T, n·hs) -> (B, n, T, hs)


def _cached_attention(attn, x, cos, sin, cache: KVCache, layer: int) -> torch.Tensor:
    B, T, _ = x.shape
    q = _heads(attn.q_proj(x), attn.n_heads, attn.d_head)  # (1, nh, T, hs)
    k = _heads(attn.k_proj(x), attn.n_kv_heads, attn.d_head)  # (1, nkv, T, hs)
    v = _heads(attn.v_proj(x), attn.n_kv_heads, attn.d_head)
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    keys, values = cache.extend(layer, apply_rope(k, cos, sin), v)  # (1, nkv, P+T, hs)
    P = cache.length
    # new query t sees cached positions and new ones up to itself; a lone query sees everything
    mask = None
    if T > 1 and P > 0:
        mask = torch.ones(T, P + T, dtype=torch.bool, device=q.device).tril(P)
    y = F.scaled_dot_product_attention(
        apply_rope(q, cos, sin),
        keys,
        values,
        attn_mask=mask,
        is_causal=P == 0 and T > 1,
        enable_gqa=attn.n_kv_heads != attn.n_heads,
    )
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, attn.n_heads * attn.d_head))


def cached_forward(
    model: nn.Module, ids: torch.Tensor, cache: KVCache, *, last_only: bool = False
) -> torch.Tensor:
    """Logits (1, T, V) of ids (1, T) at positions cache.length.., given the cached prefix;
    (1, 1, V) of the last position only with `last_only` (a long prompt's head is skipped)."""
    cfg, start, T = model.cfg, cache.length, ids.shape[1]
    if start + T > cfg.max_seq_len:
        raise ValueError(
            f"positions {start}..{start + T - 1}: beyond max_seq_len={cfg.max_seq_len}"
        )
    cos, sin = model.rope_cos[start : start + T], model.rope_sin[start : start + T]
    h = model.embed_tokens(ids) * cfg.scale_emb  # (1, T, d)
    for i, layer in enumerate(model.layers):
        a = _cached_attention(layer.self_attn, layer.input_layernorm(h), cos, sin, cache, i)
        h = torch.add(h, a, alpha=layer.residual_scale)
        h = torch.add(h, layer.mlp(layer.post_attention_layernorm(h)), alpha=layer.residual_scale)
    cache.length = start + T
    h = model.norm(h[:, -1:] if last_only else h) * readout_multiplier(cfg)
    return F.linear(h, model.embed_tokens.weight)  # tied head


# --- decoding -----------------------------------------------------------------------------------


def _recompute_step(model: nn.Module) -> Callable[[list[int]], torch.Tensor]:
    window, device = model.cfg.max_seq_len, _device(model)

    def step(ids: list[int]) -> torch.Tensor:
        return model(torch.tensor([ids[-window:]], device=device))[0, -1]

    return step


class _CachedStep:
    """Next-token logits of a growing id list, feeding the model only the ids not yet cached."""

    def __init__(self, model: nn.Module):
        self.model, self.window, self.device = model, model.cfg.max_seq_len, _device(model)
        self.cache = KVCache(len(model.layers), self.window)
        self.start = 0  # the id at cache position 0

    def __call__(self, ids: list[int]) -> torch.Tensor:
        start = max(0, len(ids) - self.window)
        if start != self.start:  # the window slid: every position in it changed
            self.cache.length, self.start = 0, start
        new = torch.tensor([ids[start + self.cache.length :]], device=self.device)
        return cached_forward(self.model, new, self.cache, last_only=True)[0, -1]


def _device(model: nn.Module) -> torch.device:
    return next(itertools.chain(model.buffers(), model.parameters())).device


def generate_ids(
    model: nn.Module,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_ids: Collection[int] = (),
    use_cache: bool = True,
) -> list[int]:
    """The ids sampled after `prompt_ids`, without the prompt and without the stop id that
    ended them (fewer than max_new_tokens ids means a stop id was drawn)."""
    sampling = Sampling(temperature, top_k, top_p)
    _check_prompt(prompt_ids, model.cfg.vocab_size)
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or max_new_tokens < 0
    ):
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 0")
    cached = use_cache and supports_cache(model)
    step = _CachedStep(model) if cached else _recompute_step(model)
    generator = torch.Generator(device=_device(model)).manual_seed(seed)
    ids, new = [int(i) for i in prompt_ids], []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = next_token(step(ids), sampling, generator)
            if token in stop_ids:
                break
            ids.append(token)
            new.append(token)
    return new


def _check_prompt(prompt_ids: Sequence[int], vocab_size: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError(
            "prompt_ids is empty: give at least one id (e.g. the eos id, which "
            "starts a document in the token stream)"
        )
    bad = [i for i in prompt_ids if not 0 <= int(i) < vocab_size]
    if bad:
        raise ValueError(f"prompt_ids {bad[:5]} are outside the embedding's 0..{vocab_size - 1}")


# --- text ---------------------------------------------------------------------------------------


def prompt_to_ids(
    tokenizer: Tokenizer, prompt: str | Sequence[int], *, chat: bool = False
) -> list[int]:
    """Ids of a prompt: a list of ids as given; text encoded, or wrapped as one user turn of
    trainables.chat's template when `chat`. Empty text becomes [eos], a document's start."""
    if not isinstance(prompt, str):
        if chat:
            raise ValueError("chat=True takes the prompt as text, not ids")
        return [int(i) for i in prompt]
    if chat:
        from trainables.chat import prompt_ids

        return prompt_ids(tokenizer, [{"role": "user", "content": prompt}])
    return tokenizer.encode([prompt])[0] or [tokenizer.eos_id]


def generate(
    model: nn.Module,
    tokenizer: Tokenizer,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    chat: bool = False,
    use_cache: bool = True,
) -> str:
    """The text generated after `prompt` (not including it). With `chat` the prompt is a user
    turn and generation also stops where the model would open the next user turn."""
    new = generate_ids(
        model,
        prompt_to_ids(tokenizer, prompt, chat=chat),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_ids=stop_ids(tokenizer, stop_at_eos=stop_at_eos, chat=chat),
        use_cache=use_cache,
    )
    return tokenizer.decode(new)


def stop_ids(tokenizer: Tokenizer, *, stop_at_eos: bool, chat: bool) -> set[int]:
    """eos ends a document and an assistant turn; in a chat, so does the next user marker."""
    if not stop_at_eos:
        return set()
    if not chat:
        return {tokenizer.eos_id}
    from trainables.chat import chat_token_ids

    return {tokenizer.eos_id, chat_token_ids(tokenizer)[0]}


def load_for_generation(
    model_dir: str | Path, *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Tokenizer]:
    """(model in eval mode, tokenizer) of any stage's folder: a model folder, or a GPTQ folder."""
    from trainables.artifact import load_model_dir

    quantized = _quantized_module()
    if quantized is not None and quantized.is_quantized(model_dir):
        loaded = quantized.load_quantized(model_dir)  # QuantLinear projections, on the CPU
        return loaded.model.to(device).eval(), loaded.tokenizer
    loaded = load_model_dir(model_dir, device=device)
    return loaded.model, loaded.tokenizer


def _quantized_module():
    try:
        from trainables import quantized
    except ImportError:  # a project without the GPTQ stage reads plain model folders only
        return None
    return quantized


def generate_from_dir(
    model_dir: str | Path, prompt: str | Sequence[int], *, device: str = "cpu", **kwargs
) -> str:
    """`generate` with the model and tokenizer of `model_dir`; kwargs are generate's."""
    model, tokenizer = load_for_generation(model_dir, device=device)
    return generate(model, tokenizer, prompt, **kwargs)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample text from a model folder.")
    parser.add_argument("model_dir")
    parser.add_argument("prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole prefix")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    model, tokenizer = load_for_generation(args.model_dir, device=args.device)
    started = time.perf_counter()
    ids = generate_ids(
        model,
        prompt_to_ids(tokenizer, args.prompt, chat=args.chat),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_ids=stop_ids(tokenizer, stop_at_eos=True, chat=args.chat),
        use_cache=not args.no_cache,
    )
    seconds = time.perf_counter() - started
    print(tokenizer.decode(ids))
    mode = "recomputed" if args.no_cache or not supports_cache(model) else "cached"
    print(
        f"{len(ids)} tokens in {seconds:.2f} s, {len(ids) / seconds:.1f} tokens/s ({mode})",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
