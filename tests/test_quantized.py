"""The gptq checkpoint layout: packing, QuantLinear and the sealed int4 model folder.

The reference packer and reader are AutoGPTQ's (`qlinear_cuda_old.QuantLinear.pack` and its
torch dequantization, the code path transformers' GPTQ integration runs on CPU), transcribed.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from trainables import checkpoint as ckpt
from trainables.artifact import load_model_dir
from trainables.gptq import QuantConfig, quantize_model, rtn_quantize
from trainables.model import MiniCPM
from trainables.quantized import (
    QuantizedWeight,
    QuantLinear,
    is_quantized,
    load_quantized,
    pack_rows,
    quantized_linears,
    save_quantized,
    unpack_rows,
)
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro-sized ops run fastest on one thread, and far faster on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def autogptq_pack(ints: torch.Tensor, zeros: torch.Tensor, bits: int):
    """AutoGPTQ's pack loop: ints (out, in), zeros (groups, out) -> qweight, qzeros."""
    intweight = ints.T.contiguous().numpy().astype(np.uint32)  # (in, out)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(32 // bits):
            qweight[row] |= intweight[row * (32 // bits) + j] << (bits * j)
    zeros = (zeros - 1).numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 32 * bits), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(32 // bits):
            qzeros[:, col] |= zeros[:, col * (32 // bits) + j] << (bits * j)
    return torch.from_numpy(qweight.astype(np.int32)), torch.from_numpy(qzeros.astype(np.int32))


def autogptq_weight(qweight, qzeros, scales, g_idx, bits: int) -> torch.Tensor:
    """AutoGPTQ's torch dequantization, in float32: the (out, in) weight a reader computes."""
    wf = torch.arange(0, 32, bits, dtype=torch.int32)[None, :]
    zeros = torch.bitwise_right_shift(qzeros[:, :, None].expand(-1, -1, 32 // bits), wf[None])
    zeros = (torch.bitwise_and(zeros, 2**bits - 1) + 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(
        qweight[:, None, :].expand(-1, 32 // bits, -1), wf[..., None]
    )
    weight = torch.bitwise_and(weight, 2**bits - 1).reshape(-1, weight.shape[-1])  # (in, out)
    g = g_idx.long()
    return (scales.float()[g] * (weight - zeros[g]).float()).T


# --- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_round_trip_is_exact(bits):
    values = torch.randint(0, 2**bits, (64, 24), generator=torch.Generator().manual_seed(bits))
    values[-1] = 2**bits - 1  # the top value sets the int32's sign bit in the last word
    words = pack_rows(values, bits)
    assert words.dtype == torch.int32 and words.shape == (64 * bits // 32, 24)
    assert torch.equal(unpack_rows(words, bits), values)


def test_the_first_input_goes_to_the_lowest_bits():
    values = torch.arange(1, 9)[:, None]  # inputs 0..7 of one output hold 1..8
    assert pack_rows(values, 4).item() == 0x87654321 - 2**32  # int32's two's complement
    assert pack_rows(torch.tensor([[3], [0], [0], [0], [0], [0], [0], [0]]), 4).item() == 3


def test_packing_matches_autogptq_bit_for_bit():
    # AutoGPTQ sizes its words as dim // 32 · bits: it needs in and out divisible by 32
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(0, 16, (64, 96), generator=g)  # (out, in)
    zeros = torch.randint(1, 16, (3, 64), generator=g)  # (groups, out)
    qweight, qzeros = autogptq_pack(ints, zeros, 4)
    assert torch.equal(pack_rows(ints.T, 4), qweight)
    assert torch.equal(pack_rows((zeros - 1).T, 4).T, qzeros)


def test_packing_refuses_what_does_not_fit():
    with pytest.raises(ValueError, match="outside \\[0, 15\\]"):
        pack_rows(torch.full((8, 1), 16), 4)
    with pytest.raises(ValueError, match="12 rows"):
        pack_rows(torch.zeros(12, 1, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="divisible by 8"):
        QuantLinear(36, 32, 2, 4)


# --- the module --------------------------------------------------------------------------------


def test_quant_linear_holds_the_quantized_weight_and_computes_with_it():
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    qw = rtn_quantize(w, QuantConfig())
    layer = QuantLinear.from_quantized(qw)
    back = layer.quantized()
    for name in ("ints", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(back, name), getattr(qw, name)), name
    x = torch.randn(3, 5, 64)
    assert torch.equal(layer(x), F.linear(x, qw.dequantize()))
    other = QuantLinear.from_quantized(rtn_quantize(-w, QuantConfig()))
    layer.load_state_dict(other.state_dict())  # new packed tensors: the cached weight is dropped
    assert torch.equal(layer(x), other(x))


# --- the folder --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(small_store):
    """A GPTQ (act-order) micro-32 with the store's tokenizer, and its config."""
    torch.manual_seed(0)
    vocab = small_store.meta["vocab_size"]
    model = MiniCPM(get_config("micro-32", vocab_size=vocab, max_seq_len=32))
    qcfg = QuantConfig(desc_act=True)
    ids = torch.randint(0, vocab, (8, 32))
    qmodel, _ = quantize_model(model, ids, qcfg, "gptq")
    return qmodel, Tokenizer.from_file(small_store.meta["tokenizer"]), qcfg


@pytest.fixture
def folder(tmp_path, quantized):
    qmodel, tok, qcfg = quantized
    lineage, metrics = {"init": "m"}, {"gptq": {"ppl": 1.5}}
    return save_quantized(tmp_path / "q", qmodel, tok, qcfg, lineage=lineage, metrics=metrics)


def greedy(model: MiniCPM, prompt: torch.Tensor, n_new: int) -> torch.Tensor:
    ids = prompt
    with torch.no_grad():
        for _ in range(n_new):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
    return ids


def test_a_saved_folder_reloads_to_the_same_weights_and_generations(folder, quantized):
    qmodel, tok, qcfg = quantized
    loaded = load_quantized(folder)
    saved, back = quantized_linears(qmodel), quantized_linears(loaded.model)
    assert sorted(saved) == sorted(back) and len(saved) == 2 * 7
    for name, layer in saved.items():
        assert torch.equal(back[name].dequantized_weight(), layer.dequantized_weight()), name
    assert torch.equal(loaded.model.embed_tokens.weight, qmodel.embed_tokens.weight)
    prompt = torch.tensor([tok.encode(["To be, or not"])[0]])
    assert torch.equal(greedy(loaded.model, prompt, 8), greedy(qmodel, prompt, 8))
    assert (
        loaded.state["lineage"] == {"init": "m"} and loaded.state["metrics"]["gptq"]["ppl"] == 1.5
    )
    assert loaded.config == qmodel.cfg and loaded.tokenizer.sha256 == tok.sha256
    assert not loaded.model.training


def test_the_folder_uses_the_gptq_layout_and_hf_names(folder, quantized):
    qmodel, _, qcfg = quantized
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.down_proj"  # in 80, out 32: groups of 32 give 3 groups
    assert (tensors[f"{name}.qweight"].dtype, tensors[f"{name}.qweight"].shape) == (
        torch.int32,
        (10, 32),
    )
    assert (tensors[f"{name}.qzeros"].dtype, tensors[f"{name}.qzeros"].shape) == (
        torch.int32,
        (3, 4),
    )
    assert (tensors[f"{name}.scales"].dtype, tensors[f"{name}.scales"].shape) == (
        torch.float16,
        (3, 32),
    )
    assert (tensors[f"{name}.g_idx"].dtype, tensors[f"{name}.g_idx"].shape) == (torch.int32, (80,))
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert "model.layers.0.input_layernorm.weight" in tensors and "model.norm.weight" in tensors
    assert not any(k.startswith("lm_head") or k.endswith("proj.weight") for k in tensors)
    for prefix, layer in quantized_linears(qmodel).items():
        parts = (tensors[f"model.{prefix}.{p}"] for p in ("qweight", "qzeros", "scales", "g_idx"))
        assert torch.equal(autogptq_weight(*parts, bits=4), layer.dequantized_weight()), prefix
    config = json.loads((folder / "quantize_config.json").read_text())
    assert config == {
        "bits": 4,
        "group_size": 32,
        "desc_act": True,
        "sym": False,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def test_act_order_g_idx_survives_the_round_trip(folder, quantized):
    name = "layers.0.mlp.down_proj"  # in 80: act-order groups of 32, 32 and 16 columns
    g_idx = load_file(folder / "model.safetensors")[f"model.{name}.g_idx"]
    assert torch.equal(g_idx, quantized[0].get_submodule(name).g_idx)
    assert torch.bincount(g_idx.long()).tolist() == [32, 32, 16]
    assert not torch.equal(g_idx.long(), torch.arange(80) // 32)  # columns went by diag(H)


def test_a_quantized_folder_is_recognised_and_a_damaged_one_refused(folder):
    assert is_quantized(folder) and not is_quantized(folder.parent / "absent")
    with pytest.raises(ckpt.CheckpointError, match="not a model folder"):
        load_model_dir(folder)  # stages that need full-precision weights do not take it
    with open(folder / "quantize_config.json", "r+b") as f:
        f.write(b"{   ")
    assert not is_quantized(folder)
    with pytest.raises(ckpt.CheckpointError, match="quantize_config.json"):
        load_quantized(folder)


def test_save_refuses_an_unquantized_model_or_a_larger_tokenizer(tmp_path, quantized):
    qmodel, tok, qcfg = quantized
    plain = MiniCPM(qmodel.cfg)
    with pytest.raises(ValueError, match="no QuantLinear"):
        save_quantized(tmp_path / "a", plain, tok, qcfg)
    small = MiniCPM(get_config("micro-32", vocab_size=300, max_seq_len=32))
    small_q, _ = quantize_model(small, torch.randint(0, 300, (2, 16)), qcfg, "rtn")
    with pytest.raises(ValueError, match=f"{tok.vocab_size} ids"):
        save_quantized(tmp_path / "b", small_q, tok, qcfg)
    assert not any(tmp_path.iterdir())


def test_quantized_weight_dequantizes_by_group():
    qw = QuantizedWeight(
        ints=torch.tensor([[0, 15, 4, 4]], dtype=torch.int32),
        scales=torch.tensor([[0.5], [0.25]], dtype=torch.float16),
        zeros=torch.tensor([[2], [4]], dtype=torch.int32),
        g_idx=torch.tensor([0, 0, 1, 0], dtype=torch.int32),
        bits=4,
    )
    assert qw.dequantize().tolist() == [[-1.0, 6.5, 0.0, 1.0]]
