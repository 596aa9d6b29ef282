"""Export to Hugging Face Llama: transformers loads the folder and computes the project's logits."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import without_chat_pieces
from safetensors.torch import load_file

from trainables.artifact import load_model_dir, save_model_dir
from trainables.corpus import EMBEDDED, iter_documents
from trainables.export_hf import MARKER_FILE, export_llama
from trainables.model import MiniCPM, apply_rope, rope_tables
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer, train_tokenizer

transformers = pytest.importorskip(
    "transformers", reason="transformers loads the exported folder; pip install transformers"
)

# Text the project's tokenizer must encode the same way under transformers: code indentation,
# runs of spaces, digits, tabs and CRLF, CJK and emoji (byte fallback), a literal "▁".
HARD_TEXTS = (
    "hello world",
    "    def f(x):\n        return 12345 + x  ",
    "中文字符 emoji 😀 and ü",
    "a\tb\r\nc\n\n\n   ",
    " leading space",
    "x ▁y",  # SentencePiece escapes spaces as "▁", so both decode this one to "x  y"
    "",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Micro models decode token by token: on a shared machine one thread is many times faster
    than two contending ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return list(itertools.islice(iter_documents([EMBEDDED]), 600))


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory) -> Tokenizer:
    return train_tokenizer(docs[:400], 1024, tmp_path_factory.mktemp("tok"))


def _model_dir(path, tok: Tokenizer, name: str, seed: int = 0, **overrides):
    """A random model whose norm gains are not 1, so a swapped or dropped gain shows."""
    torch.manual_seed(seed)
    cfg = get_config(name, **({"vocab_size": tok.vocab_size, "max_seq_len": 64} | overrides))
    model = MiniCPM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return save_model_dir(path, model, tok, stage="test")


def _hf_logits(folder, ids: torch.Tensor) -> torch.Tensor:
    hf = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return hf(ids).logits.float()


# the second shape is the non-trivial one: scale_emb 12, scale_depth 1.4, d 128 = 2·d_base under
# μP, GQA (4 query heads on 2 kv heads) and 32 spare embedding rows beyond the tokenizer
SHAPES = {
    "micro-32-sp": ("micro-32", {"parametrization": "sp", "scale_emb": 3.0}),
    "micro-128-mup-gqa": ("micro-128", {"n_kv_heads": 2, "vocab_size": 1056}),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_transformers_reproduces_the_logits_in_float32(tmp_path, tok, shape):
    name, overrides = SHAPES[shape]
    src = _model_dir(tmp_path / "m", tok, name, **overrides)
    out = export_llama(src, tmp_path / "hf")
    model = load_model_dir(src).model
    ids = torch.randint(
        0, model.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours = model(ids)
    delta = (_hf_logits(out, ids) - ours).abs().max().item()
    assert delta < 1e-4, f"max |Δlogits| = {delta:.3g}"
    assert ours.abs().max() > 1.0  # logits of real size, so 1e-4 is a tight bound


def test_the_scalings_are_folded_and_the_head_untied(tmp_path, tok):
    src = _model_dir(tmp_path / "m", tok, "micro-128", n_kv_heads=2)
    out = export_llama(src, tmp_path / "hf")
    cfg = load_model_dir(src).config
    w, ours = load_file(out / "model.safetensors"), load_file(src / "model.safetensors")
    s = 1.4 / 6**0.5  # scale_depth / sqrt(L), micro-128 has 6 layers
    torch.testing.assert_close(w["model.embed_tokens.weight"], ours["embed_tokens.weight"] * 12.0)
    torch.testing.assert_close(w["lm_head.weight"], ours["embed_tokens.weight"] * 64 / 128)
    o, down = "layers.5.self_attn.o_proj.weight", "layers.5.mlp.down_proj.weight"
    torch.testing.assert_close(w[f"model.{o}"], ours[o] * s)
    torch.testing.assert_close(w[f"model.{down}"], ours[down] * s)
    q = "layers.0.self_attn.q_proj.weight"
    assert torch.equal(w[f"model.{q}"], ours[q])
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["architectures"] == [
        "LlamaForCausalLM"
    ]
    expected = {"num_key_value_heads": 2, "num_attention_heads": 4, "head_dim": 32}
    assert {k: config[k] for k in expected} == expected
    assert config["max_position_embeddings"] == cfg.max_seq_len == 64


def test_rope_is_hf_rotate_half():
    """The model's tables and rotation equal transformers' LlamaRotaryEmbedding + rotate_half."""
    from transformers.models.llama import modeling_llama as hf

    config = transformers.LlamaConfig(
        hidden_size=128, num_attention_heads=4, head_dim=32, max_position_embeddings=64
    )
    x = torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(64)[None]
    hf_cos, hf_sin = hf.LlamaRotaryEmbedding(config)(x, positions)
    cos, sin = rope_tables(32, 64, 1e4)
    torch.testing.assert_close(cos, hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin[0], rtol=0, atol=1e-6)
    hf_q, _ = hf.apply_rotary_pos_emb(x, x, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(x, cos, sin), hf_q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_exports_stay_close(tmp_path, tok, dtype):
    src = _model_dir(tmp_path / "m", tok, "micro-64", n_kv_heads=1)
    out = export_llama(src, tmp_path / "hf", dtype=dtype)
    weights = load_file(out / "model.safetensors")
    assert {str(t.dtype) for t in weights.values()} == {f"torch.{dtype}"}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    ids = torch.randint(0, tok.vocab_size, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = load_model_dir(src).model(ids)
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(ids).logits
    # rounding the weights to 8 (bf16) or 11 (fp16) mantissa bits moves logits by ~1% of scale
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()


# --- the tokenizer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("exported")
    return export_llama(_model_dir(root / "m", tok, "micro-32"), root / "hf")


def test_transformers_tokenizer_encodes_like_the_project(exported, tok, docs):
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    texts = [*HARD_TEXTS, *docs[400:600]]  # documents the tokenizer was not trained on
    ours = tok.encode(texts)
    theirs = [hf.encode(t, add_special_tokens=False) for t in texts]
    mismatched = [t[:60] for t, a, b in zip(texts, ours, theirs, strict=True) if a != b]
    assert not mismatched
    assert all(hf.decode(ids) == tok.decode(ids) for ids in ours)
    assert hf("x")["input_ids"] == tok.encode(["x"])[0]  # no bos added, as in the token stream


def test_special_token_text_is_where_the_two_differ(exported, tok):
    """SentencePiece never parses control pieces from text; transformers matches its added
    tokens in text unless asked not to (split_special_tokens), which is how a chat template's
    "<s>" and "</s>" become ids."""
    text = "a <s> b </s>"
    hf = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf.encode(text, add_special_tokens=False)[-1] == tok.eos_id
    assert tok.eos_id not in tok.encode([text])[0]
    plain = transformers.AutoTokenizer.from_pretrained(exported, split_special_tokens=True)
    assert plain.encode(text, add_special_tokens=False) == tok.encode([text])[0]


def test_the_chat_template_renders_the_projects_ids(tmp_path, tok):
    chat = pytest.importorskip("trainables.chat", reason="the chat template needs trainables.chat")
    chat_tok = chat.add_chat_tokens(tok)
    src = _model_dir(tmp_path / "m", chat_tok, "micro-32")
    out = export_llama(src, tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    talk = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "Hi 12 中"},
        {"role": "assistant", "content": " Hello.\n"},
        {"role": "user", "content": "Bye"},
    ]
    prompt = hf.apply_chat_template(talk, tokenize=True, add_generation_prompt=True)
    assert list(prompt["input_ids"]) == chat.prompt_ids(chat_tok, talk)
    answered = [*talk, {"role": "assistant", "content": "ok"}]
    full = hf.apply_chat_template(answered, tokenize=True)
    assert list(full["input_ids"]) == chat.encode_chat(chat_tok, answered)[0]
    # the markers are not special: decoding without <s> and </s> keeps them, as Tokenizer does
    decoded = hf.decode(chat.prompt_ids(chat_tok, talk), skip_special_tokens=True)
    assert decoded == chat.render_chat(talk)


def test_a_tokenizer_without_chat_markers_gets_no_template(tmp_path, tok, exported):
    assert "chat_template" in json.loads((exported / "tokenizer_config.json").read_text())
    plain = without_chat_pieces(tok)  # ours reserve the markers; a foreign tokenizer may not
    out = export_llama(_model_dir(tmp_path / "m", plain, "micro-32"), tmp_path / "hf")
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())


# --- the folder ---------------------------------------------------------------------------------


def test_export_replaces_an_export_and_refuses_anything_else(tmp_path, tok):
    src = _model_dir(tmp_path / "m", tok, "micro-32")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an export"):
        export_llama(src, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    out = export_llama(src, tmp_path / "hf", dtype="bfloat16")
    marker = json.loads((out / MARKER_FILE).read_text())
    assert marker["dtype"] == "bfloat16" and marker["stage"] == "test"
    export_llama(src, out)  # an export is replaced in place
    assert json.loads((out / MARKER_FILE).read_text())["dtype"] == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m", "mine"]  # no staging left


def test_a_failed_export_leaves_nothing(tmp_path, tok):
    with pytest.raises(ValueError, match="dtype='int8'"):
        export_llama(tmp_path / "m", tmp_path / "hf", dtype="int8")
    src = _model_dir(tmp_path / "m", tok, "micro-32")
    (src / "model.safetensors").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="model.safetensors"):
        export_llama(src, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_transformers_greedy_decoding_continues_like_the_project(tmp_path, tok):
    from trainables.generate import generate_ids

    src = _model_dir(tmp_path / "m", tok, "micro-64", n_kv_heads=1, seed=4)
    out = export_llama(src, tmp_path / "hf")
    model = load_model_dir(src).model
    prompt = tok.encode(["def main():"])[0]
    ours = generate_ids(model, prompt, max_new_tokens=12, temperature=0.0, stop_ids={2})
    hf = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
    assert [t for t in theirs[0, len(prompt) :].tolist() if t != tok.eos_id] == ours
