"""OpenAI-style log probabilities of generated tokens: the chosen token's and the top alternatives'."""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

import torch

MAX_TOP_LOGPROBS = 20


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte→character table (GPT-2's): printable bytes stand for
    themselves, the others are shifted to code points from 256 up."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece-style byte pieces (Gemma, Llama 2)


def _has_type(node: Any, name: str) -> bool:
    """Whether a tokenizers component (as JSON) is, or contains, one of type ``name``."""
    if isinstance(node, dict):
        return node.get("type") == name or any(_has_type(v, name) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, name) for v in node)
    return False


def is_byte_level(tokenizer: Any) -> bool:
    """Whether a tokenizer's pieces are GPT-2 byte-level symbols (else SentencePiece-style text pieces)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return True
    decoder = json.loads(backend.to_str()).get("decoder")
    return _has_type(decoder, "ByteLevel")


class TokenTexts:
    """The text and raw bytes of single tokens (a token may hold part of a character: byte-level BPE
    symbols, or SentencePiece byte-fallback pieces ``<0xNN>``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.byte_level = is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            symbol = self.tokenizer.convert_ids_to_tokens(token_id)
            decoder = _byte_decoder()
            byte_piece = BYTE_FALLBACK.fullmatch(symbol) if isinstance(symbol, str) else None
            if self.byte_level and isinstance(symbol, str) and symbol and all(c in decoder for c in symbol):
                raw = bytes(decoder[c] for c in symbol)
            elif not self.byte_level and byte_piece is not None:
                raw = bytes([int(byte_piece[1], 16)])
            else:  # text pieces, special and added tokens: their decoded text
                raw = self.tokenizer.decode([token_id]).encode()
            hit = (raw.decode("utf-8", errors="replace"), list(raw))
            self._cache[token_id] = hit
        return hit


# A row's log probabilities: the chosen token's, and (logprob, token id) of the most likely ones.
LogprobsRow = tuple[float, list[tuple[float, int]]]


def token_logprobs(logits: torch.Tensor, token_id: int, top: int, texts: TokenTexts) -> dict[str, Any]:
    """One entry of OpenAI's ``choices[].logprobs.content`` for a row of raw logits ``[vocab]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    alternatives: list[tuple[float, int]] = []
    if top > 0:
        values, ids = torch.topk(logp, min(top, logp.shape[-1]))
        alternatives = list(zip(values.tolist(), ids.tolist(), strict=True))
    return logprobs_entry(token_id, (float(logp[token_id]), alternatives), top, texts)


def logprobs_entry(token_id: int, row: LogprobsRow, top: int, texts: TokenTexts) -> dict[str, Any]:
    """The entry of ``token_id`` from its row's log probabilities (the first ``top`` alternatives)."""
    text, raw = texts(token_id)
    entry: dict[str, Any] = {"token": text, "logprob": row[0], "bytes": raw, "top_logprobs": []}
    for value, tid in row[1][:top]:
        t_text, t_raw = texts(tid)
        entry["top_logprobs"].append({"token": t_text, "logprob": value, "bytes": t_raw})
    return entry
