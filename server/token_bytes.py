"""A token's own bytes, for the ``bytes`` of an OpenAI logprob entry.

A token that holds part of a multi-byte character decodes to U+FFFD, so its text's UTF-8 is
not its bytes; the field exists so that a client can join such tokens back into characters.
The bytes are read from the tokenizer's piece: byte-level BPE (GPT-2's scheme, SmolLM2's,
Llama 3's, Qwen's) writes each byte as one printable character, and SentencePiece with byte
fallback (Llama 2, Mistral) writes a byte as ``<0xAB>`` and a space as U+2581."""

from __future__ import annotations

from typing import Callable


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's character for each byte: printable Latin-1 bytes stand for
    themselves, the others are moved to 256 and up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, moved = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + moved)] = b
            moved += 1
    return chars


_BYTE_LEVEL = _byte_level_alphabet()


def token_bytes_reader(tok) -> Callable[[int], bytes | None]:
    """``tid -> bytes`` for this tokenizer (None where its pieces are in no form known here:
    the caller falls back to the text's UTF-8). Built once per tokenizer."""
    cached = getattr(tok, "_safeserve_token_bytes", None)
    if cached is not None:
        return cached
    decoder = getattr(getattr(tok, "backend_tokenizer", None), "decoder", None)
    kind = type(decoder).__name__ if decoder is not None else ""
    special = set(getattr(tok, "all_special_ids", ()) or ())

    def read(tid: int) -> bytes | None:
        if tid in special:
            return None
        piece = tok.convert_ids_to_tokens(tid)
        if not isinstance(piece, str):
            return None
        if kind == "ByteLevel":
            if all(c in _BYTE_LEVEL for c in piece):
                return bytes(_BYTE_LEVEL[c] for c in piece)
            return None
        if kind == "Sequence" or "\u2581" in piece:  # SentencePiece-style pieces
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    return None
            return piece.replace("\u2581", " ").encode("utf-8")
        return None

    try:
        tok._safeserve_token_bytes = read
    except AttributeError:  # a tokenizer that takes no attributes: read each time
        pass
    return read
