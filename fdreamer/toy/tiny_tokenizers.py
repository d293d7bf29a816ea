"""The tiny tokenizers, built offline from a fixed English word list (:data:`WORDS`).

A byte-level BPE CLIPTokenizer (the SD text encoder's and CLIP's) and a Unigram T5Tokenizer in which
every word of the list is one token; any other word still tokenizes (into characters). Saved by
``fdreamer make-tiny-models`` (:mod:`fdreamer.toy.tiny_models`) in the folder layouts the real
tokenizers use.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # transformers is imported inside the builders
    from transformers import CLIPTokenizer, T5Tokenizer

# Words that become single tokens in both tiny tokenizers; any other word still tokenizes (into
# characters). Lowercase letters only: the CLIP tokenizer lowercases and splits on non-letters.
WORDS: tuple[str, ...] = tuple(dict.fromkeys("""
    a an the to and or over under with without on in of at from into onto by is are it its this
    that while then as near behind above below through along past between one two three four
    red green blue yellow orange purple pink white black gray grey brown cyan magenta violet
    gold silver colour color colored coloured bright dark light pale deep
    circle square triangle rectangle star ball box disk disc dot dots ring cube shape shapes
    line lines stripe stripes blob object objects pattern
    slides slide moves move moving spins spin spinning rotates rotate rotating grows grow growing
    shrinks shrink shrinking stays stay still bounces bounce bouncing falls fall falling rises
    rise rising drifts drift drifting jumps jump turns turn flies fly rolls roll shakes shake
    fades fade pulses pulse appears appear disappears zooms zoom flickers flashes static
    left right up down across around toward towards away back forth center centre middle top
    bottom side sides edge corner diagonally clockwise counterclockwise horizontally vertically
    background foreground small large big tiny huge textured soft smooth rough noisy plain
    striped checkered gradient solid blurry sharp slowly quickly slow fast steadily gently
    video clip scene frame frames camera screen image picture photo view
""".split()))

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_CHARS = string.ascii_letters + string.digits + string.punctuation


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode char table of byte-level BPE (the GPT-2/CLIP convention).

    Printable latin-1 bytes map to themselves; the remaining 68 bytes (controls, space, ...) map to
    ``chr(256 + k)`` in byte order, so every byte has a visible, whitespace-free symbol.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return table


def _apply_merges(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Segment one word by BPE: repeatedly merge (all occurrences of) the lowest-ranked pair."""
    pieces = list(symbols)
    while len(pieces) > 1:
        ranked = [(ranks[p], p) for p in zip(pieces, pieces[1:]) if p in ranks]
        if not ranked:
            break
        _, best = min(ranked)
        merged: list[str] = []
        i = 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def build_clip_bpe(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab and merges of a byte-level CLIP BPE in which every word of ``words`` is one token.

    Vocab order mirrors OpenAI CLIP: the 256 byte symbols, the same with ``</w>``, one entry per
    merge, then ``<|startoftext|>`` and ``<|endoftext|>``. Merges are appended word by word, each
    joining the first two pieces of the word's current segmentation (building it left to right);
    appended merges rank after all earlier ones, so earlier words keep their single token.
    """
    byte_symbol = bytes_to_unicode()
    base = [byte_symbol[b] for b in range(256)]
    vocab = {sym: i for i, sym in enumerate(base)}
    for sym in base:
        vocab[sym + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        if not word.isalpha() or word != word.lower():
            raise ValueError(f"tokenizer word list entry {word!r} must be lowercase letters only")
        symbols = [byte_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        pieces = _apply_merges(symbols, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = _apply_merges(symbols, ranks)
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return vocab, merges


def build_clip_tokenizer(words: tuple[str, ...] = WORDS) -> CLIPTokenizer:
    """In-memory CLIPTokenizer over :func:`build_clip_bpe`; checks every word is a single token."""
    from transformers import CLIPTokenizer

    vocab, merges = build_clip_bpe(words)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    for word in words:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"CLIP BPE construction bug: {word!r} tokenizes to {len(ids)} tokens")
    return tok


def build_t5_tokenizer(words: tuple[str, ...] = WORDS) -> T5Tokenizer:
    """In-memory Unigram T5Tokenizer: ``<pad>``=0, ``</s>``=1, ``<unk>``=2, then ``▁word`` pieces.

    Whole words (lowercase and capitalised) score -4, the bare ``▁`` -6 and single characters -8,
    so known words come out as one piece and anything else as ``▁`` + characters.
    """
    from transformers import T5Tokenizer

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0}
    for word in words:
        pieces.setdefault("\u2581" + word, -4.0)
        pieces.setdefault("\u2581" + word.capitalize(), -4.0)
    pieces.setdefault("\u2581", -6.0)
    for ch in T5_CHARS:
        pieces.setdefault(ch, -8.0)
    tok = T5Tokenizer(vocab=list(pieces.items()), extra_ids=0, model_max_length=512)
    for word in words:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"T5 vocab construction bug: {word!r} tokenizes to {len(ids)} pieces")
    return tok


def write_bpe_files(tok_dir: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Also write ``vocab.json`` + ``merges.txt`` like the SD/OpenAI tokenizer folders have."""
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (tok_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
