"""MiniCPM's chat template: special tokens, encoding with response-only labels, record formats.

A conversation is rendered as MiniCPM-2B-sft's Hugging Face chat template renders it, plus an eos
after each assistant turn so that a model learns where a response ends:

    <s>{system}<用户>{user}<AI>{assistant}</s><用户>{user}<AI>{assistant}</s>

The system turn is optional and, as in that template, is plain text before the first `<用户>`.
`<用户>` and `<AI>` are USER_DEFINED pieces appended to the SentencePiece model (`add_chat_tokens`):
every existing id keeps its meaning, the encoder always cuts text at them, and `decode` prints
them, so `parse_chat(tok.decode(ids))` gives the messages back. <s> and </s> are control ids and
are inserted as ids, never parsed from text. Contents are kept exactly as given (not stripped).

`encode_chat` returns `labels` aligned with `ids` (labels[i] is the target of ids[i], -100 where
no loss is taken): only assistant contents and their eos are trained on (MiniCPM, facts §4:
"loss only on responses"); with `only_last=True` only the final response is (DPO scores the
final response alone). A causal LM trains on inputs ids[:-1] with targets labels[1:].

    tok = add_chat_tokens(loaded.tokenizer); model = resize_embeddings(model, tok.vocab_size)
    ids, labels = encode_chat(tok, [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello."}])
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Sequence

import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2
from torch import nn

from trainables.model import MiniCPM
from trainables.tokenizer import CHAT_PIECES, Tokenizer

# MiniCPM's user marker ("user" in Chinese) and assistant marker (generation starts after it).
# Tokenizers trained here reserve both (tokenizer.CHAT_PIECES); others get them appended.
USER, AI = CHAT_PIECES
CHAT_TOKENS = (USER, AI)
ROLES = ("system", "user", "assistant")
IGNORE = -100  # F.cross_entropy's ignore_index: no loss at this position


class ChatFormatError(ValueError):
    """A conversation or record that does not fit the template; the message says which turn."""


# --- tokenizer and embedding ------------------------------------------------------------------


def add_chat_tokens(tok: Tokenizer) -> Tokenizer:
    """`tok` with `<用户>` and `<AI>` appended as USER_DEFINED pieces; `tok` itself if present.

    Appending keeps every existing id (and so every pretrained embedding row) unchanged.
    """
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tok.model_bytes)
    present = {p.piece for p in proto.pieces}
    missing = [t for t in CHAT_TOKENS if t not in present]
    if not missing:
        return tok
    for text in missing:
        piece = proto.pieces.add()
        piece.piece, piece.score = text, 0.0
        piece.type = sp_pb2.ModelProto.SentencePiece.USER_DEFINED
    return Tokenizer(proto.SerializeToString(), f"{tok.path}+chat")


def chat_token_ids(tok: Tokenizer) -> tuple[int, int]:
    """(user id, ai id); a tokenizer without them is refused with the fix."""
    encoded = tok.encode(list(CHAT_TOKENS))
    if any(len(ids) != 1 for ids in encoded):  # without the pieces they encode as several bytes
        raise ChatFormatError(
            f"tokenizer {tok.path} has no {USER} / {AI} pieces; call add_chat_tokens(tok) first"
        )
    return encoded[0][0], encoded[1][0]


def resize_embeddings(model: MiniCPM, vocab_size: int) -> MiniCPM:
    """A copy of `model` whose (tied) embedding has `vocab_size` rows.

    Old rows are copied bit for bit; new rows are the mean of the old rows, so a new token starts
    as an "average" token with logit h·mean instead of noise (a common choice, e.g. Hewitt 2021,
    "Initializing new word embeddings for pretrained language models"). No RNG is drawn.
    """
    old = model.embed_tokens.weight
    n_old = old.shape[0]
    if vocab_size < n_old:
        raise ValueError(f"vocab_size={vocab_size}: must be >= the model's {n_old} rows")
    resized = copy.deepcopy(model)
    resized.cfg = dataclasses.replace(model.cfg, vocab_size=vocab_size)
    with torch.no_grad():
        mean = old.double().mean(dim=0).to(old.dtype)  # float64 sum: exact enough at any V
        new = torch.cat([old.detach(), mean.expand(vocab_size - n_old, -1)]).clone()
    # assigning an existing submodule name keeps its place, so parameter order is unchanged
    resized.embed_tokens = nn.Embedding.from_pretrained(new, freeze=False)
    return resized


# --- messages ---------------------------------------------------------------------------------


def check_messages(messages: Sequence[dict], *, ends_with: str = "assistant") -> None:
    """Raise ChatFormatError unless `messages` is [system?] then user/assistant alternating,
    starting with user and ending with the role `ends_with`."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise ChatFormatError(f"messages must be a non-empty list of dicts, got {messages!r:.80}")
    for i, m in enumerate(messages):
        _check_message(i, m)
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        expected = ROLES[1 + i % 2]  # user, assistant, user, ...
        if m["role"] != expected:
            where = i + len(messages) - len(turns)
            raise ChatFormatError(
                f"message {where} has role {m['role']!r} where {expected!r} is expected: after an "
                "optional first system message, user and assistant turns alternate, user first"
            )
    if not turns or turns[-1]["role"] != ends_with:
        raise ChatFormatError(f"the last message must have role {ends_with!r}")


def _check_message(i: int, m: object) -> None:
    if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m:
        raise ChatFormatError(
            f"message {i}: expected {{'role': ..., 'content': ...}}, got {m!r:.80}"
        )
    if m["role"] not in ROLES:
        raise ChatFormatError(f"message {i}: role {m['role']!r} is not one of {ROLES}")
    content = m.get("content")
    if not isinstance(content, str):
        raise ChatFormatError(f"message {i}: content must be a string, got {content!r:.80}")
    for marker in CHAT_TOKENS:
        if marker in content:
            raise ChatFormatError(
                f"message {i}: content contains the chat marker {marker!r}, which would be "
                "read as a turn boundary; remove or escape it"
            )


# --- encoding ---------------------------------------------------------------------------------


def encode_chat(
    tok: Tokenizer, messages: Sequence[dict], *, only_last: bool = False
) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation ending with an assistant turn; labels are -100 except on
    assistant contents and the eos after each of them (the last one only, if `only_last`)."""
    check_messages(messages, ends_with="assistant")
    ids, labels = _encode(tok, messages)
    if only_last:
        n_prompt = len(_encode(tok, messages[:-1])[0])  # the same ids up to the final <AI>
        labels = [IGNORE] * n_prompt + labels[n_prompt:]
    return ids, labels


def prompt_ids(tok: Tokenizer, messages: Sequence[dict]) -> list[int]:
    """The ids to generate the next assistant turn from: messages ending with a user turn,
    rendered up to and including the `<AI>` marker."""
    check_messages(messages, ends_with="user")
    return _encode(tok, messages)[0]


def _encode(tok: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
    user_id, ai_id = chat_token_ids(tok)
    texts = [m["content"] for m in messages]
    pieces = tok.encode(texts) if texts else []
    ids, labels = [tok.bos_id], [IGNORE]
    for m, content_ids in zip(messages, pieces, strict=True):
        if m["role"] == "assistant":
            turn = content_ids + [tok.eos_id]
            ids += turn
            labels += turn
            continue
        turn = ([user_id] + content_ids + [ai_id]) if m["role"] == "user" else content_ids
        ids += turn
        labels += [IGNORE] * len(turn)
    return ids, labels


def render_chat(messages: Sequence[dict]) -> str:
    """The template as text, without <s> and </s>: what `tok.decode(ids)` prints."""
    parts = []
    for m in messages:
        prefix = USER if m["role"] == "user" else ""
        suffix = AI if m["role"] == "user" else ""
        parts.append(prefix + m["content"] + suffix)
    return "".join(parts)


def parse_chat(text: str) -> list[dict]:
    """The messages of a rendered conversation (the inverse of `render_chat`).

    An empty final assistant turn reads back as a prompt: the text ends with `<AI>` either way.
    """
    head, *turns = text.split(USER)
    messages = [{"role": "system", "content": head}] if head else []
    for i, turn in enumerate(turns):
        user, sep, assistant = turn.partition(AI)
        if not sep:
            raise ChatFormatError(f"turn {i}: {USER} without a following {AI}")
        messages.append({"role": "user", "content": user})
        if assistant or i < len(turns) - 1:
            messages.append({"role": "assistant", "content": assistant})
    return messages


# --- record formats ---------------------------------------------------------------------------

_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def parse_transcript(text: str) -> list[dict]:
    """Messages of an Anthropic hh-rlhf transcript "\\n\\nHuman: ...\\n\\nAssistant: ...".

    Contents are stripped of surrounding whitespace. A transcript ending in "Assistant:" (a
    prompt) ends with an assistant message of content "". Raises ChatFormatError on text before
    the first marker or on turns that do not alternate.
    """
    if not isinstance(text, str):
        raise ChatFormatError(f"transcript must be a string, got {type(text).__name__}")
    parts = _HH_MARKER.split(text)  # [before, role, content, role, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise ChatFormatError(f"transcript must start with '\\n\\nHuman:', got {text[:60]!r}")
    messages = [
        {"role": _HH_ROLES[role], "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    last = messages[-1]["role"]
    check_messages(messages, ends_with=last)
    return messages


def to_messages(record: dict) -> list[dict]:
    """Messages of one SFT record, in any of three forms:

    - {"messages": [{"role": ..., "content": ...}, ...]} (OpenAI / TRL style);
    - {"prompt": str, "response": str} with an optional "system": str;
    - {"instruction": str, "input": str (may be ""), "output": str} (Alpaca); the input follows
      the instruction after a blank line.
    The result is validated by `check_messages` (it ends with an assistant turn).
    """
    if not isinstance(record, dict):
        raise ChatFormatError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
    elif "prompt" in record:
        messages = _pair(record)
    elif "instruction" in record:
        messages = _alpaca(record)
    else:
        keys = ", ".join(sorted(record)) or "none"
        raise ChatFormatError(
            f"record has keys {keys}; expected 'messages', 'prompt'+'response' or "
            "'instruction'+'input'+'output'"
        )
    check_messages(messages, ends_with="assistant")
    return list(messages)


def _pair(record: dict) -> list[dict]:
    if "response" not in record:
        raise ChatFormatError("record has 'prompt' but no 'response'")
    messages = [
        {"role": "user", "content": record["prompt"]},
        {"role": "assistant", "content": record["response"]},
    ]
    if record.get("system"):
        messages.insert(0, {"role": "system", "content": record["system"]})
    return messages


def _alpaca(record: dict) -> list[dict]:
    if "output" not in record:
        raise ChatFormatError("record has 'instruction' but no 'output'")
    instruction, extra = record["instruction"], record.get("input") or ""
    if not isinstance(extra, str):
        raise ChatFormatError(f"field 'input' must be a string, got {type(extra).__name__}")
    if extra and isinstance(instruction, str):
        instruction = f"{instruction}\n\n{extra}"
    pair = {"prompt": instruction, "response": record["output"], "system": record.get("system")}
    return _pair(pair)
