"""The chat template: special tokens, response-only labels, embedding resize, record formats."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import without_chat_pieces

from trainables.chat import (
    AI,
    IGNORE,
    USER,
    ChatFormatError,
    add_chat_tokens,
    chat_token_ids,
    encode_chat,
    parse_chat,
    parse_transcript,
    prompt_ids,
    render_chat,
    resize_embeddings,
    to_messages,
)
from trainables.data import DataConfig, prepare
from trainables.model import MiniCPM
from trainables.shapes import get_config
from trainables.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What does `json.dumps` do?"},
    {"role": "assistant", "content": "Serialize ``obj`` to a JSON formatted ``str``."},
    {"role": "user", "content": "和 emoji 😀 too?\n  indented"},
    {"role": "assistant", "content": "Yes: <b> and 中文."},
]


@pytest.fixture(scope="module")
def base_tok() -> Tokenizer:
    """A tokenizer without the markers (ours reserve them), as a Llama or Qwen one would be."""
    return without_chat_pieces(Tokenizer.from_file(prepare(DataConfig()).meta["tokenizer"]))


@pytest.fixture(scope="module")
def tok(base_tok) -> Tokenizer:
    return add_chat_tokens(base_tok)


def test_chat_tokens_are_appended_and_old_ids_keep_their_pieces(base_tok, tok):
    assert tok.vocab_size == base_tok.vocab_size + 2
    assert chat_token_ids(tok) == (base_tok.vocab_size, base_tok.vocab_size + 1)
    assert [tok.piece(i) for i in range(base_tok.vocab_size)] == [
        base_tok.piece(i) for i in range(base_tok.vocab_size)
    ]
    text = "def dumps(obj, *, skipkeys=False):\n    return 'x' * 3  # 中文"
    assert tok.encode([text]) == base_tok.encode([text])
    assert add_chat_tokens(tok) is tok  # idempotent
    with pytest.raises(ChatFormatError, match="add_chat_tokens"):
        chat_token_ids(base_tok)


def test_template_round_trips_through_ids_and_text(tok):
    ids, _ = encode_chat(tok, CONVERSATION)
    user_id, ai_id = chat_token_ids(tok)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids.count(user_id) == 2 and ids.count(ai_id) == 2 and ids.count(tok.eos_id) == 2
    text = tok.decode(ids)
    assert text == render_chat(CONVERSATION)
    assert text.startswith("Answer briefly." + USER) and AI in text
    assert parse_chat(text) == CONVERSATION
    # encoding the rendered text gives the same ids, less the control ids <s> and </s>
    assert tok.encode([text])[0] == [i for i in ids if i not in (tok.bos_id, tok.eos_id)]


def test_labels_are_exactly_the_responses_and_their_eos(tok):
    ids, labels = encode_chat(tok, CONVERSATION)
    assert len(ids) == len(labels)
    trained = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE]
    assert all(label in (IGNORE, i) for i, label in zip(ids, labels, strict=True))
    responses = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    expected = [i for ids_ in tok.encode(responses) for i in ids_ + [tok.eos_id]]
    assert trained == expected
    # every other token, markers and system/user text included, carries no loss
    n_masked = sum(label == IGNORE for label in labels)
    assert n_masked == len(ids) - len(expected)


def test_only_last_trains_on_the_final_response_alone(tok):
    ids, labels = encode_chat(tok, CONVERSATION)
    same_ids, last = encode_chat(tok, CONVERSATION, only_last=True)
    n_prompt = len(prompt_ids(tok, CONVERSATION[:4]))
    assert same_ids == ids
    assert last == [IGNORE] * n_prompt + labels[n_prompt:]
    assert [i for i in last if i != IGNORE] == tok.encode([CONVERSATION[4]["content"]])[0] + [
        tok.eos_id
    ]


def test_prompt_ends_with_the_ai_marker_and_prefixes_the_conversation(tok):
    prompt = prompt_ids(tok, CONVERSATION[:4])
    ids, labels = encode_chat(tok, CONVERSATION)
    assert prompt[-1] == chat_token_ids(tok)[1]
    assert ids[: len(prompt)] == prompt and labels[len(prompt)] != IGNORE
    with pytest.raises(ChatFormatError, match="last message must have role 'user'"):
        prompt_ids(tok, CONVERSATION)


@pytest.mark.parametrize(
    "messages, match",
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "hi"}], "message 0 has role 'assistant'"),
        ([{"role": "bot", "content": "hi"}], "role 'bot' is not one of"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "string"),
        (CONVERSATION[:2] + CONVERSATION[1:3], "message 2 has role 'user'"),
        (CONVERSATION[:2], "last message must have role 'assistant'"),
        ([{"role": "user", "content": f"a {AI} b"}, CONVERSATION[2]], "chat marker"),
    ],
)
def test_bad_conversations_are_refused_with_the_turn_named(tok, messages, match):
    with pytest.raises(ChatFormatError, match=match):
        encode_chat(tok, messages)


def test_resize_keeps_old_rows_and_initialises_new_rows_to_their_mean(base_tok, tok):
    torch.manual_seed(0)
    model = MiniCPM(dataclasses.replace(get_config("micro-32"), vocab_size=base_tok.vocab_size))
    rng_before = torch.get_rng_state()
    resized = resize_embeddings(model, tok.vocab_size)
    assert torch.equal(torch.get_rng_state(), rng_before)  # draws no random numbers
    old, new = model.embed_tokens.weight, resized.embed_tokens.weight
    assert resized.cfg.vocab_size == tok.vocab_size == new.shape[0]
    assert torch.equal(new[: old.shape[0]], old) and new.requires_grad
    torch.testing.assert_close(new[old.shape[0] :], old.mean(0).expand(2, -1))
    assert [n for n, _ in resized.named_parameters()] == [n for n, _ in model.named_parameters()]
    ids = torch.randint(0, base_tok.vocab_size, (2, 12))
    assert torch.equal(resized(ids)[..., : old.shape[0]], model(ids))  # old logits unchanged
    with pytest.raises(ValueError, match="must be >="):
        resize_embeddings(model, 10)


def test_hh_rlhf_transcripts_parse_into_alternating_turns():
    text = (
        "\n\nHuman: How do I sort a list?\n\nAssistant: Use sorted(xs)."
        "\n\nHuman: Thanks\n\nAssistant:"
    )
    assert parse_transcript(text) == [
        {"role": "user", "content": "How do I sort a list?"},
        {"role": "assistant", "content": "Use sorted(xs)."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": ""},
    ]
    with pytest.raises(ChatFormatError, match="must start with"):
        parse_transcript("Hello\n\nAssistant: hi")
    with pytest.raises(ChatFormatError, match="message 1 has role 'user'"):
        parse_transcript("\n\nHuman: a\n\nHuman: b\n\nAssistant: c")


def test_records_of_three_forms_become_messages():
    pair = {"prompt": "Q", "response": "A", "system": "S"}
    alpaca = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
    assert to_messages({"messages": CONVERSATION}) == CONVERSATION
    assert to_messages(pair) == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert to_messages(alpaca)[0] == {"role": "user", "content": "Add the numbers.\n\n2 3"}
    assert to_messages(alpaca | {"input": ""})[0]["content"] == "Add the numbers."
    for bad, match in [({"prompt": "Q"}, "no 'response'"), ({"text": "x"}, "keys text")]:
        with pytest.raises(ChatFormatError, match=match):
            to_messages(bad)
