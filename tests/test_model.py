"""The MiniCPM decoder: counts, causality, RoPE convention, GQA, μP init/readout/groups."""

import math

import pytest
import torch

from trainables.model import (
    MiniCPM,
    apply_rope,
    build_optimizer,
    param_groups,
    rope_tables,
    segment_mask,
    set_lr,
)
from trainables.shapes import embedding_params, micro, non_embedding_params


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    return MiniCPM(cfg)


def _tokens(vocab, batch=2, seq=16, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "cfg",
    [micro(32), micro(64), micro(160), micro(128, n_kv_heads=2), micro(96, n_kv_heads=1)],
    ids=lambda c: f"{c.name}-kv{c.n_kv_heads}",
)
def test_num_params_matches_closed_form(cfg):
    model = MiniCPM(cfg)
    assert model.num_params() == non_embedding_params(cfg)
    assert model.num_params(non_embedding=False) == non_embedding_params(cfg) + embedding_params(
        cfg
    )


def test_logits_shape_and_dtype():
    cfg = micro(64, vocab_size=300)
    logits = _model(cfg)(_tokens(300, batch=3, seq=20))
    assert logits.shape == (3, 20, 300) and logits.dtype == torch.float32


def test_sequence_longer_than_rope_table_is_rejected():
    cfg = micro(32, max_seq_len=8)
    with pytest.raises(ValueError, match="max_seq_len=8"):
        _model(cfg)(_tokens(cfg.vocab_size, seq=9))


@pytest.mark.parametrize("width", [64, 256])
def test_loss_at_init_matches_derivation(width):
    # RMSNorm(h) has unit RMS and the tied rows have std init_std, so a logit of an unrelated
    # token is ~ N(0, σ²), σ = init_std·sqrt(d)/width_mult; but h ≈ scale_emb·E[input], so the
    # input token's own logit is ≈ init_std·d/width_mult = init_std·d_base (6.4 here). With
    # random targets the expected loss is ln(V·exp(σ²/2) + exp(self_logit)), above ln V.
    cfg = micro(width)
    tokens = _tokens(cfg.vocab_size, batch=8, seq=65)
    with torch.no_grad():
        loss = _model(cfg)(tokens[:, :-1], tokens[:, 1:]).item()
    sigma = cfg.init_std * math.sqrt(width) / cfg.width_mult
    self_logit = cfg.init_std * cfg.dim_model_base
    expected = math.log(cfg.vocab_size * math.exp(sigma**2 / 2) + math.exp(self_logit))
    assert loss == pytest.approx(expected, abs=0.15)
    assert math.log(cfg.vocab_size) < loss < math.log(cfg.vocab_size) + 0.6


def test_ignored_targets_leave_the_mean():
    cfg = micro(32, vocab_size=100)
    model, tokens = _model(cfg), _tokens(100, seq=9)
    masked = tokens[:, 1:].clone()
    masked[:, :4] = -100
    with torch.no_grad():
        logits = model(tokens[:, :-1])
        loss = model(tokens[:, :-1], masked)
    expected = torch.nn.functional.cross_entropy(
        logits[:, 4:].flatten(0, 1), masked[:, 4:].flatten()
    )
    assert torch.allclose(loss, expected)


def test_causal():
    cfg = micro(64, vocab_size=256)
    model, tokens = _model(cfg), _tokens(256, seq=24)
    changed = tokens.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 256
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_documents_with_segments_are_computed_as_if_alone(dtype):
    """Three documents packed in one row (the last one padding-like): with segment ids each
    position's logits are those of its document run alone, whatever was packed before it."""
    cfg = micro(128, n_kv_heads=2, vocab_size=256)
    model, row = _model(cfg), _tokens(256, batch=1, seq=24)
    bounds = [(0, 7), (7, 16), (16, 24)]
    segments = torch.tensor([[i for i, (a, b) in enumerate(bounds) for _ in range(a, b)]])
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        packed = model(row, segments=segments).float()
        alone = [model(row[:, a:b]).float() for a, b in bounds]
        plain = model(row).float()
    for (a, b), logits in zip(bounds, alone, strict=True):
        assert torch.allclose(packed[:, a:b], logits, atol=tol, rtol=0), (a, b)
    assert torch.allclose(plain[:, :7], alone[0], atol=tol, rtol=0)  # the first is alone anyway
    assert not torch.allclose(plain[:, 7:16], alone[1], atol=1e-2), "without segments, it sees A"
    # a single segment is the plain causal model
    with torch.no_grad():
        one = model(row, segments=torch.zeros_like(row))
        assert torch.allclose(one, model(row), atol=1e-5, rtol=0)


def test_segment_mask_is_causal_and_block_diagonal():
    mask = segment_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    ).bool()
    assert torch.equal(mask, expected)


def test_rope_is_hf_rotate_half_and_relative():
    d_head, theta = 8, 1e4
    cos, sin = rope_tables(d_head, 32, theta)  # (T, hs)
    x = torch.zeros(1, 1, 32, d_head)
    x[..., 0] = 1.0
    y = apply_rope(x, cos, sin)
    pos = torch.arange(32.0)
    # channel 0 pairs with channel d_head/2 (HF Llama), at frequency theta^0 = 1
    assert torch.allclose(y[0, 0, :, 0], torch.cos(pos), atol=1e-6)
    assert torch.allclose(y[0, 0, :, d_head // 2], torch.sin(pos), atol=1e-6)
    assert y[..., [1, 2, 3, 5, 6, 7]].abs().max() == 0
    q, k = torch.randn(2, d_head).unbind(0)
    rq = apply_rope(q.expand(1, 1, 32, d_head), cos, sin)[0, 0]
    rk = apply_rope(k.expand(1, 1, 32, d_head), cos, sin)[0, 0]
    # the score depends on the offset only: (m, n) = (5, 2) equals (20, 17)
    assert torch.allclose(rq[5] @ rk[2], rq[20] @ rk[17], atol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa_cfg = micro(128, n_kv_heads=2, vocab_size=256)  # 4 query heads, 2 per kv head
    gqa, mha = _model(gqa_cfg), _model(micro(128, vocab_size=256))
    state = gqa.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # HF repeat_kv: query head i reads kv head i // n_rep
            state[name] = w.view(2, 32, 128).repeat_interleave(2, dim=0).reshape(128, 128)
    mha.load_state_dict(state)
    tokens = _tokens(256)
    with torch.no_grad():
        assert torch.allclose(gqa(tokens), mha(tokens), atol=1e-5)


def test_bf16_autocast_runs_and_agrees():
    cfg = micro(64, n_kv_heads=1, vocab_size=512)
    model, tokens = _model(cfg), _tokens(512, seq=33)
    loss32 = model(tokens[:, :-1], tokens[:, 1:])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(tokens[:, :-1]).dtype == torch.bfloat16
        loss16 = model(tokens[:, :-1], tokens[:, 1:])
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(loss32.item(), abs=0.05)
    loss16.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("scaled_embedding", [False, True])
def test_mup_init_stds(scaled_embedding):
    cfg = micro(256, width_scaled_embedding_init=scaled_embedding)  # width_mult 4
    model, sp = _model(cfg), _model(micro(256, parametrization="sp"))
    assert model.layers[0].mlp.down_proj.weight.std().item() == pytest.approx(0.05, rel=0.03)
    emb_std = 0.05 if scaled_embedding else 0.1
    assert model.embed_tokens.weight.std().item() == pytest.approx(emb_std, rel=0.03)
    assert sp.layers[0].self_attn.q_proj.weight.std().item() == pytest.approx(0.1, rel=0.03)
    assert sp.embed_tokens.weight.std().item() == pytest.approx(0.1, rel=0.03)
    assert all(p.eq(1).all() for n, p in model.named_parameters() if p.ndim == 1)


def test_mup_readout_divides_by_width_mult():
    mup, sp = (
        _model(micro(256, vocab_size=128)),
        _model(micro(256, vocab_size=128, parametrization="sp")),
    )
    sp.load_state_dict(mup.state_dict())
    tokens = _tokens(128)
    with torch.no_grad():
        assert torch.allclose(mup(tokens) * 4.0, sp(tokens), atol=1e-5)


def test_param_groups_lr_scales():
    cfg = micro(256)  # width_mult 4: hidden matrices train at lr / 4
    model = MiniCPM(cfg)
    groups = {g["name"]: g for g in param_groups(model, weight_decay=0.1)}
    assert {n: g["lr_scale"] for n, g in groups.items()} == {
        "hidden": 0.25,
        "embedding": 1.0,
        "norm": 1.0,
    }
    assert {n: g["weight_decay"] for n, g in groups.items()} == {
        "hidden": 0.1,
        "embedding": 0.1,
        "norm": 0.0,
    }
    L = cfg.n_layers
    assert [len(groups[n]["params"]) for n in ("hidden", "embedding", "norm")] == [
        7 * L,
        1,
        2 * L + 1,
    ]
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == model.num_params(False)
    sp = param_groups(MiniCPM(micro(256, parametrization="sp")))
    assert [g["lr_scale"] for g in sp] == [1.0, 1.0, 1.0]


def test_build_optimizer_and_set_lr_apply_scales():
    model = MiniCPM(micro(128))  # width_mult 2
    opt = build_optimizer(model, 1e-2)
    assert [g["lr"] for g in opt.param_groups] == [5e-3, 1e-2, 1e-2]
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8
    set_lr(opt, 4e-3)
    assert [g["lr"] for g in opt.param_groups] == [2e-3, 4e-3, 4e-3]


def _train(cfg, tokens, steps=3):
    model = _model(cfg)
    opt = build_optimizer(model, 1e-2)
    for _ in range(steps):
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_mup_equals_sp_at_base_width():
    mup_cfg = micro(64, vocab_size=512)  # width_mult 1
    sp_cfg = micro(64, vocab_size=512, parametrization="sp")
    tokens = _tokens(512, seq=33)
    a, b = _model(mup_cfg), _model(sp_cfg)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))
    strip = lambda gs: [(g["name"], g["lr_scale"], g["weight_decay"], len(g["params"])) for g in gs]
    assert strip(param_groups(a)) == strip(param_groups(b))
    (a, _), (b, _) = _train(mup_cfg, tokens), _train(sp_cfg, tokens)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_mup_differs_from_sp_off_base_width():
    tokens = _tokens(512, seq=33)
    a, _ = _train(micro(128, vocab_size=512), tokens, steps=1)
    b, _ = _train(micro(128, vocab_size=512, parametrization="sp"), tokens, steps=1)
    assert not torch.equal(a.layers[0].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)


def test_overfits_a_tiny_batch():
    cfg = micro(64, vocab_size=256, max_seq_len=64)
    tokens = _tokens(256, batch=4, seq=33, seed=0)
    model = _model(cfg)
    opt = build_optimizer(model, 1e-2)
    losses = []
    for _ in range(50):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[0] > math.log(256)
    assert losses[-1] < 0.05 * losses[0]  # measured: 6.36 -> 0.002
