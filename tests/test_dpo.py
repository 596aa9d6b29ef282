"""DPO: the loss of Rafailov et al. 2023 eq. 7 against hand-computed values, response log-probs,
truncation, the config, and run_dpo on a micro-32 model folder (learning, resume, reuse)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from trainables import checkpoint as ckpt
from trainables.artifact import from_checkpoint, load_model_dir, read_state
from trainables.chat import CHAT_TOKENS, IGNORE, add_chat_tokens
from trainables.data import DataConfig, prepare
from trainables.dpo import (
    DPOConfig,
    batch_rows,
    build_optimizer,
    collate,
    dpo_loss,
    encode_pair,
    run_dpo,
    sequence_logps,
    truncate_pair,
)
from trainables.model import MiniCPM
from trainables.preference_data import PreferencePair
from trainables.schedules import ScheduleConfig
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer
from trainables.trainer import TrainConfig, train

# --- the loss ----------------------------------------------------------------------------------


def test_the_loss_is_ln2_and_rewards_zero_when_policy_equals_reference():
    logps = torch.tensor([-12.0, -3.5, -80.0])
    losses, chosen, rejected = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.1)
    assert torch.allclose(losses, torch.full((3,), math.log(2.0)))
    assert torch.equal(chosen, torch.zeros(3)) and torch.equal(rejected, torch.zeros(3))


def test_the_loss_matches_a_hand_computed_pair():
    # β = 0.5; chosen ratio −1 − (−2) = 1, rejected ratio −3 − (−2) = −1: z = 0.5·(1 − (−1)) = 1
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5
    )
    assert losses.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)  # 0.3132617
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)


def test_the_gradient_raises_the_chosen_and_lowers_the_rejected_log_prob():
    chosen = torch.tensor([-5.0, -7.0], requires_grad=True)
    rejected = torch.tensor([-6.0, -4.0], requires_grad=True)
    ref_c, ref_r = torch.tensor([-5.5, -7.0]), torch.tensor([-5.0, -4.5])
    losses, _, _ = dpo_loss(chosen, rejected, ref_c, ref_r, beta=0.2)
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (
        rejected.grad > 0
    ).all()  # descent: chosen up, rejected down
    z = 0.2 * ((chosen - ref_c) - (rejected - ref_r)).detach()
    assert torch.allclose(chosen.grad, -0.2 * torch.sigmoid(-z))  # dL/dπc = −β·σ(−z)


def test_the_loss_stays_finite_at_extreme_margins():
    big = torch.tensor([1e4, -1e4], requires_grad=True)
    zero = torch.zeros(2)
    losses, _, _ = dpo_loss(big, zero, zero, zero, beta=1.0)
    losses.sum().backward()
    assert torch.allclose(losses.detach(), torch.tensor([0.0, 1e4]))  # −log σ(z) → max(−z, 0)
    assert torch.isfinite(big.grad).all()


# --- log-probs and tokens ------------------------------------------------------------------------


def test_sequence_logps_sums_response_tokens_only_and_ignores_padding():
    torch.manual_seed(0)
    model = MiniCPM(get_config("micro-32", vocab_size=300))
    ids = torch.randint(4, 300, (1, 9))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a 4-token prompt: the last 5 tokens are the response
    logp = F.log_softmax(model(ids[:, :-1]).float(), dim=-1)  # (1, 8, V)
    expected = sum(logp[0, t - 1, ids[0, t]] for t in range(4, 9))
    assert sequence_logps(model, ids, labels).item() == pytest.approx(expected.item(), abs=1e-4)
    padded_ids = torch.cat([ids, torch.full((1, 5), 3)], dim=1)
    padded_labels = torch.cat([labels, torch.full((1, 5), IGNORE)], dim=1)
    padded = sequence_logps(model, padded_ids, padded_labels)
    assert padded.item() == pytest.approx(expected.item(), abs=1e-4)


def test_truncation_cuts_the_prompt_from_the_left_and_responses_from_the_right():
    prompt = [1] + list(range(10, 30))  # <s> and 20 tokens
    long, short = (list(range(100, 130)),) * 2, (list(range(200, 205)),) * 2
    cut_prompt, (a, b) = truncate_pair(prompt, [long, short], 32, max_prompt_len=8, bos_id=1)
    assert cut_prompt == [1] + list(range(23, 30))  # <s> kept, then the prompt's last 7 tokens
    assert a == (long[0][:24], long[1][:24]) and b == short  # 8 + 24 = 32 tokens
    fits, responses = truncate_pair(prompt, [short, short], 32, max_prompt_len=8, bos_id=1)
    assert fits == prompt and responses == [short, short]  # nothing cut when the pair fits


@pytest.fixture(scope="module")
def embedded_tok() -> Tokenizer:
    return Tokenizer.from_file(prepare(DataConfig()).meta["tokenizer"])


def test_an_encoded_pair_shares_its_prompt_and_trains_only_on_responses(embedded_tok):
    tok = add_chat_tokens(embedded_tok)
    prompt = ({"role": "user", "content": "What does `len(obj)` do?"},)
    pair = PreferencePair(prompt, "Return the number of items.", "Return nothing.", "t:1")
    c_ids, c_labels, r_ids, r_labels = encode_pair(tok, pair, seq_len=64, max_prompt_len=32)
    n = next(i for i, label in enumerate(c_labels) if label != IGNORE)
    assert c_ids[:n] == r_ids[:n] and all(label == IGNORE for label in r_labels[:n])
    assert c_labels[n:] == c_ids[n:] and c_ids[-1] == tok.eos_id  # response and its eos
    assert tok.decode(c_ids[n:-1]) == "Return the number of items."
    ids, labels = collate([(c_ids, c_labels, r_ids, r_labels)], tok.pad_id)
    assert (
        ids.shape == (2, max(len(c_ids), len(r_ids))) and (labels[1, len(r_ids) :] == IGNORE).all()
    )


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    first = [batch_rows(10, 3, seed=0, step=s) for s in range(3)]  # 3 batches/epoch, 1 left out
    seen = sorted(int(i) for rows in first for i in rows)
    assert len(seen) == 9 and len(set(seen)) == 9
    assert [list(batch_rows(10, 3, 0, s)) for s in range(3)] == [list(r) for r in first]
    assert list(batch_rows(10, 3, 0, 3)) != list(first[0])  # epoch 1: a new permutation


# --- config and optimizer -------------------------------------------------------------------------


def test_the_defaults_are_minicpms_dpo_stage():
    cfg = DPOConfig()
    assert (cfg.lr, cfg.beta, cfg.epochs, cfg.sources) == (1e-5, 0.1, 1, ("embedded:preferences",))
    assert cfg.schedule(100) == ScheduleConfig(kind="cosine", warmup_steps=10, min_lr_ratio=0.0)
    assert cfg.total_steps(1000) == 125 and DPOConfig(steps=7).total_steps(1000) == 7


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("beta", 0.0, "a number > 0"),
        ("lr", float("nan"), "a number > 0"),
        ("batch_size", 0, "an int > 0"),
        ("steps", 2.5, "None or an int > 0"),
        ("max_prompt_len", 256, r"\[1, seq_len=256\)"),
        ("precision", "fp16", "one of"),
        ("sources", (), "paths/URLs"),
    ],
)
def test_a_bad_config_value_is_named_with_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"DPOConfig\.{field}=.*expected .*{allowed}"):
        DPOConfig(**{field: value})


def test_every_parameter_trains_at_the_same_lr_without_mup_scaling():
    model = MiniCPM(get_config("micro-32", vocab_size=300, dim_model_base=16))  # μP: hidden lr / 2
    opt = build_optimizer(model, DPOConfig(lr=3e-5))
    assert {g["lr"] for g in opt.param_groups} == {3e-5}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# --- run_dpo on a model folder --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory, embedded_tok) -> str:
    """micro-32 pretrained for 40 short steps on the embedded corpus, sealed as a model folder
    with the plain embedded tokenizer: run_dpo adds the chat tokens and rows itself."""
    store = prepare(DataConfig())
    root = tmp_path_factory.mktemp("dpo-init")
    model_cfg = get_config("micro-32", vocab_size=embedded_tok.vocab_size)
    schedule = ScheduleConfig(kind="constant")
    cfg = TrainConfig(lr=0.02, batch_size=8, seq_len=64, tokens=40 * 8 * 64, eval_every=10**6)
    cfg = dataclasses.replace(cfg, schedule=schedule, checkpoint_every=0, save_steps=(40,))
    train(model_cfg, cfg, store, save_dir=root / "pre", device="cpu")
    out = root / "sft"
    from_checkpoint(root / "pre" / "step_00000040", model_cfg, embedded_tok.path, out, stage="sft")
    return str(out)


SMALL = DPOConfig(lr=2e-3, steps=24, batch_size=8, seq_len=96, eval_every=8, eval_pairs=64)


def test_held_out_reward_accuracy_and_margin_rise(sft_folder, tmp_path):
    reports = []
    out = tmp_path / "dpo"
    metrics = run_dpo(SMALL, sft_folder, str(out), report=lambda m, c: reports.append(m))
    val = [r for r in reports if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 8, 16, 24]
    assert val[0]["val_loss"] == pytest.approx(math.log(2.0), abs=1e-6)  # policy == reference
    # at step 0 every reward is 0 and a tie counts as wrong; then well above chance (0.5)
    accuracies = [r["val_reward_accuracy"] for r in val]
    assert accuracies[0] == 0.0 and min(accuracies[1:]) >= 0.65 and accuracies[-1] >= 0.7
    margins = [r["val_reward_margin"] for r in val]
    assert margins[0] == 0.0 and margins == sorted(margins) and margins[-1] > 1.5 * margins[1]
    assert val[-1]["val_loss"] < val[1]["val_loss"] < math.log(2.0)
    assert metrics == val[-1] and metrics["train_loss"] < math.log(2.0)
    loaded = load_model_dir(out)
    assert loaded.state["stage"] == "dpo" and loaded.state["metrics"] == metrics
    assert loaded.state["lineage"]["init"] == sft_folder
    assert all(len(loaded.tokenizer.encode([t])[0]) == 1 for t in CHAT_TOKENS)
    assert loaded.config.vocab_size == loaded.tokenizer.vocab_size
    assert not (tmp_path / "dpo.work").exists()  # checkpoints are removed once the folder is sealed
    again = run_dpo(SMALL, sft_folder, str(out), report=lambda m, c: pytest.fail("trained again"))
    assert again == metrics


class Killed(RuntimeError):
    pass


def test_a_killed_run_resumes_to_the_uninterrupted_weights(sft_folder, tmp_path):
    cfg = dataclasses.replace(SMALL, steps=6, checkpoint_every=2, eval_every=3, eval_pairs=16)
    whole = run_dpo(cfg, sft_folder, str(tmp_path / "whole"))

    def kill_at_step_4(metrics, checkpoint):
        if checkpoint is not None and metrics["step"] == 4:
            raise Killed

    with pytest.raises(Killed):
        run_dpo(cfg, sft_folder, str(tmp_path / "resumed"), report=kill_at_step_4)
    work = tmp_path / "resumed.work"
    assert [p.name for p in work.iterdir()] == ["step_00000004"]
    with pytest.raises(ValueError, match="another DPO run"):
        run_dpo(dataclasses.replace(cfg, beta=0.2), sft_folder, str(tmp_path / "resumed"))
    steps = []
    resumed = run_dpo(
        cfg, sft_folder, str(tmp_path / "resumed"), report=lambda m, c: steps.append(m["step"])
    )
    assert steps == [6]  # nothing before the checkpoint is trained or reported again
    for key in ("val_loss", "val_reward_margin", "val_chosen_logps", "val_rejected_logps"):
        assert resumed[key] == pytest.approx(whole[key], abs=1e-6)
    a = load_model_dir(tmp_path / "whole").model.state_dict()
    b = load_model_dir(tmp_path / "resumed").model.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert read_state(tmp_path / "resumed")["stage"] == "dpo"


def test_a_folder_of_another_stage_is_not_taken_as_finished(sft_folder):
    with pytest.raises(ValueError, match="stage 'sft', not 'dpo'"):
        run_dpo(SMALL, sft_folder, sft_folder)
    ckpt.verify_checkpoint(sft_folder)  # untouched
