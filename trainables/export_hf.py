"""Export a model folder as a Hugging Face ``LlamaForCausalLM`` folder that needs no custom code.

MiniCPM is a Llama decoder plus three linear scalings (facts §1, arXiv 2404.06395). Each one is a
constant factor on a linear map, so it folds into the weights and the exported model is a plain
Llama with the same logits:

    h0     = Embedding(ids) · scale_emb                    embed_tokens  ← E · scale_emb
    h     += o_proj(·) · scale_depth/√L                    o_proj        ← W_o · scale_depth/√L
    h     += down_proj(·) · scale_depth/√L                 down_proj     ← W_down · scale_depth/√L
    logits = E · (RMSNorm(h) · d_base/d)                   lm_head       ← E · d_base/d (μP; 1 SP)

so the input embedding and the head are no longer equal: the export is untied. RoPE needs no
conversion: ``trainables.model.apply_rope`` pairs channel i with i + d_head/2, which is HF's
``rotate_half`` layout, and its tables are HF's default RoPE at ``rope_theta``.

The folder holds config.json, model.safetensors, generation_config.json, the SentencePiece
tokenizer.model with a LlamaTokenizer tokenizer_config.json and special_tokens_map.json (no bos is
added: the project's token stream separates documents by eos only), and minicpm_export.json, which
names the source folder and the folded factors and marks the folder as an export. It is written
as a hidden sibling and renamed into place; an existing export is replaced, any other folder
refused.

Serving and conversion (both read LlamaForCausalLM folders as they are):
- vLLM: ``vllm serve OUT`` or ``vllm.LLM(model=OUT)``; the tokenizer is converted from
  tokenizer.model by transformers. Export with ``dtype="bfloat16"`` (or pass ``--dtype``) on GPUs.
- llama.cpp: ``python convert_hf_to_gguf.py OUT --outtype f16`` (or bf16 / q8_0, then
  ``llama-quantize`` for k-quants). It reads the hyper-parameters from config.json, permutes q/k
  for its own RoPE layout itself, and builds a "llama" (SentencePiece) vocabulary from
  tokenizer.model, taking add_space_prefix from the model's add_dummy_prefix (false here) and
  padding the vocabulary to config.json's vocab_size when the embedding has spare rows.

    python -m trainables.export_hf runs/x/sft/model runs/x/sft/hf --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from trainables import checkpoint as ckpt
from trainables.artifact import LoadedModel, load_model_dir
from trainables.model import MiniCPM, readout_multiplier
from trainables.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MARKER_FILE = "minicpm_export.json"
KIND = "minicpm-hf-export"
WEIGHTS_FILE = "model.safetensors"


# --- the folding (pure functions of the model) ----------------------------------------------


def residual_scale(model: MiniCPM) -> float:
    """scale_depth / sqrt(L): MiniCPM's factor on every residual branch."""
    return model.cfg.scale_depth / math.sqrt(model.cfg.n_layers)


def llama_state_dict(model: MiniCPM) -> dict[str, torch.Tensor]:
    """HF Llama tensors with MiniCPM's scalings folded in, float32, each with its own storage."""
    cfg, s = model.cfg, residual_scale(model)
    fold = {"self_attn.o_proj.weight": s, "mlp.down_proj.weight": s}
    embedding = model.embed_tokens.weight.detach().float()
    out = {
        "model.embed_tokens.weight": embedding * cfg.scale_emb,
        "model.norm.weight": model.norm.weight.detach().float().clone(),
        "lm_head.weight": embedding * readout_multiplier(cfg),
    }
    for i, layer in enumerate(model.layers):
        for name, p in layer.named_parameters():
            out[f"model.layers.{i}.{name}"] = p.detach().float() * fold.get(name, 1.0)
    return {k: v.contiguous() for k, v in out.items()}


def llama_config(model: MiniCPM, tokenizer: Tokenizer, dtype: str) -> dict[str, Any]:
    """config.json of LlamaForCausalLM; rope_theta and torch_dtype also under their older names."""
    cfg = model.cfg
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.d_head,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": cfg.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        **token_ids(tokenizer),
        "torch_dtype": dtype,
        "dtype": dtype,
    }


# --- the tokenizer files ----------------------------------------------------------------------


def token_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids for config.json and generation_config.json; None where the model has none."""
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id}
    return {f"{role}_token_id": i if i >= 0 else None for role, i in ids.items()}


def special_tokens(tokenizer: Tokenizer) -> dict[str, str]:
    """The pieces of bos, eos, unk and pad as the SentencePiece model names them."""
    ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "unk": tokenizer.unk_id}
    ids["pad"] = tokenizer.pad_id
    return {f"{role}_token": tokenizer.piece(i) for role, i in ids.items() if i >= 0}


def added_tokens(tokenizer: Tokenizer) -> dict[str, dict]:
    """tokenizer_config's added_tokens_decoder: the control pieces (special) and the
    user-defined pieces such as the chat markers (not special, so decode prints them, as
    ``Tokenizer.decode`` does), each matched whole in text before BPE as SentencePiece does."""
    proto = sp_pb2.ModelProto.FromString(tokenizer.model_bytes)
    piece = sp_pb2.ModelProto.SentencePiece
    kinds = {piece.UNKNOWN: True, piece.CONTROL: True, piece.USER_DEFINED: False}  # -> special
    return {
        str(i): {
            "content": p.piece,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": kinds[p.type],
        }
        for i, p in enumerate(proto.pieces)
        if p.type in kinds
    }


def chat_template(tokenizer: Tokenizer) -> str | None:
    """trainables.chat's template in Jinja, when the tokenizer has its chat markers.

    ``<s>{system}<用户>{user}<AI>{assistant}</s>...``: contents unstripped, an eos after each
    assistant turn; a conversation ending in a user turn already ends in ``<AI>``, where the
    assistant's turn begins, so the generation prompt adds nothing.
    """
    try:
        from trainables import chat
    except ImportError:  # a project without the chat stage exports no template
        return None
    pieces = {p["content"] for p in added_tokens(tokenizer).values()}
    if not set(chat.CHAT_TOKENS) <= pieces:
        return None
    user_turn = "{{ '" + chat.USER + "' + m['content'] + '" + chat.AI + "' }}"
    return (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        + user_turn
        + "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
        "{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
    )


def tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict:
    """LlamaTokenizer settings that reproduce ``Tokenizer.encode``: no bos, no prefix space.

    The SentencePiece model has add_dummy_prefix false, so ``add_prefix_space`` and ``legacy``
    are false too (HF would otherwise prepend "▁" to the text).
    """
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "legacy": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "sp_model_kwargs": {},
        "added_tokens_decoder": added_tokens(tokenizer),
        **special_tokens(tokenizer),
    }
    template = chat_template(tokenizer)
    if template is not None:
        config["chat_template"] = template
    return config


# --- writing ----------------------------------------------------------------------------------


def export_llama(model_dir: str | Path, out: str | Path, *, dtype: str = "float32") -> Path:
    """Write the model folder `model_dir` as a LlamaForCausalLM folder at `out`; returns `out`.

    `dtype` is "float32", "bfloat16" or "float16" (the weights are folded in float32 first).
    """
    if dtype not in DTYPES:
        raise ValueError(f"export_llama dtype={dtype!r}: allowed {sorted(DTYPES)}")
    dest = Path(out)
    _check_replaceable(dest)
    loaded = load_model_dir(model_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex}")
    staging.mkdir()
    try:
        _write_folder(staging, loaded.model, loaded.tokenizer, dtype, _provenance(loaded))
        ckpt.swap_into_place(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    ckpt.fsync_dir(dest.parent)
    return dest


def _write_folder(
    folder: Path, model: MiniCPM, tokenizer: Tokenizer, dtype: str, provenance: dict
) -> None:
    tensors = {k: v.to(DTYPES[dtype]) for k, v in llama_state_dict(model).items()}
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    # trainables.generate's default sampling, so both sample alike out of the box
    generation = {**token_ids(tokenizer), "do_sample": True, "temperature": 0.8}
    files = {
        "config.json": llama_config(model, tokenizer, dtype),
        "generation_config.json": generation,
        "tokenizer_config.json": tokenizer_config(tokenizer, model.cfg.max_seq_len),
        "special_tokens_map.json": special_tokens(tokenizer),
        MARKER_FILE: {"kind": KIND, "dtype": dtype, **provenance},
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    (folder / "tokenizer.model").write_bytes(tokenizer.model_bytes)
    for path in folder.iterdir():
        ckpt.seal(path)  # flush before the rename makes the folder visible


def _provenance(loaded: LoadedModel) -> dict[str, Any]:
    model = loaded.model
    return {
        "source": str(Path(loaded.path).resolve()),
        "stage": loaded.state.get("stage"),
        "lineage": loaded.state.get("lineage", {}),
        "tokenizer_sha256": loaded.tokenizer.sha256,
        "folded": {
            "embed_tokens": model.cfg.scale_emb,
            "o_proj_and_down_proj": residual_scale(model),
            "lm_head": readout_multiplier(model.cfg),
        },
    }


def _check_replaceable(dest: Path) -> None:
    """Refuse to replace anything but an earlier export (or an empty folder)."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest}: exists and is a file, not an export folder")
    if dest.is_dir() and any(dest.iterdir()) and not _is_export(dest):
        raise FileExistsError(
            f"{dest}: exists and is not an export (no {MARKER_FILE} of kind {KIND!r}); "
            "refusing to replace it: choose another folder or remove it"
        )


def _is_export(folder: Path) -> bool:
    try:
        return json.loads((folder / MARKER_FILE).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a model folder to HF LlamaForCausalLM.")
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    print(export_llama(args.model_dir, args.out, dtype=args.dtype))


if __name__ == "__main__":
    main()
