"""A1111's prompt -> 77-token chunks logic, as pure Python (no model needed).

Ports ``modules/prompt_parser.parse_prompt_attention`` and
``modules/sd_hijack_clip.TextConditionalModel.tokenize_line`` with the webui's defaults
(emphasis "Original", "Prompt word wrap length limit" 20, ``BREAK`` support): each chunk holds
75 prompt tokens between a start and an end token; an embedding's vectors never straddle two
chunks; ``fixes`` record where each embedding's vectors go.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from medical_diffusion.errors import MedDiffError

CHUNK_LENGTH = 75

_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` for A1111's ``(a)``, ``(a:1.3)``, ``[a]``, escapes and ``BREAK``."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        part = m.group(0)
        weight = m.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            for i, piece in enumerate(re.split(_RE_BREAK, part)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([piece, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


@dataclass
class PromptChunk:
    """77 token ids (start + 75 + end), their weights, and ``(offset, name)`` embedding fixes.

    A fix's offset counts from the first token after the start token, as in A1111.
    """

    tokens: list[int] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    fixes: list[tuple[int, str]] = field(default_factory=list)


@dataclass
class ChunkSpec:
    """What the chunker needs to know about a tokenizer."""

    tokenize: Callable[[str], list[int]]
    id_start: int
    id_end: int
    comma_token: int | None
    chunk_length: int = CHUNK_LENGTH
    comma_padding_backtrack: int = 20
    emphasis: bool = True


def build_lookup(spec: ChunkSpec, embedding_sizes: Mapping[str, int]) -> dict[int, list[tuple[list[int], str, int]]]:
    """First token id -> ``[(ids, name, n_vectors)]``, longest match first (A1111's ``ids_lookup``)."""
    lookup: dict[int, list[tuple[list[int], str, int]]] = {}
    for name, n in embedding_sizes.items():
        if n > spec.chunk_length:
            raise MedDiffError(
                f"embedding {name!r} has {n} vectors; at most {spec.chunk_length} fit in one prompt chunk"
            )
        ids = spec.tokenize(name)
        if not ids:
            raise MedDiffError(f"embedding name {name!r} has no tokens")
        lookup.setdefault(ids[0], []).append((ids, name, int(n)))
    for entries in lookup.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return lookup


def tokenize_line(
    line: str, spec: ChunkSpec, embedding_sizes: Mapping[str, int] | None = None
) -> tuple[list[PromptChunk], int]:
    """A1111's ``tokenize_line``: the prompt as a list of chunks and its token count."""
    lookup = build_lookup(spec, embedding_sizes or {})
    parsed = parse_prompt_attention(line) if spec.emphasis else [[line, 1.0]]
    tokenized = [spec.tokenize(text) for text, _ in parsed]
    length = spec.chunk_length
    chunks: list[PromptChunk] = []
    chunk = PromptChunk()
    token_count = 0
    last_comma = -1

    def next_chunk(is_last: bool = False) -> None:
        nonlocal token_count, last_comma, chunk
        token_count += len(chunk.tokens) if is_last else length
        to_add = length - len(chunk.tokens)
        if to_add > 0:
            chunk.tokens += [spec.id_end] * to_add
            chunk.multipliers += [1.0] * to_add
        chunk.tokens = [spec.id_start] + chunk.tokens + [spec.id_end]
        chunk.multipliers = [1.0] + chunk.multipliers + [1.0]
        last_comma = -1
        chunks.append(chunk)
        chunk = PromptChunk()

    for tokens, (text, weight) in zip(tokenized, parsed):
        if text == "BREAK" and weight == -1:
            next_chunk()
            continue
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == spec.comma_token:
                last_comma = len(chunk.tokens)
            elif (
                spec.comma_padding_backtrack != 0
                and len(chunk.tokens) == length
                and last_comma != -1
                and len(chunk.tokens) - last_comma <= spec.comma_padding_backtrack
            ):
                cut = last_comma + 1
                reloc_tokens, reloc_mults = chunk.tokens[cut:], chunk.multipliers[cut:]
                reloc_fixes = [(off - cut, name) for off, name in chunk.fixes if off >= cut]
                chunk.tokens, chunk.multipliers = chunk.tokens[:cut], chunk.multipliers[:cut]
                chunk.fixes = [(off, name) for off, name in chunk.fixes if off < cut]
                next_chunk()
                chunk.tokens, chunk.multipliers, chunk.fixes = reloc_tokens, reloc_mults, reloc_fixes
            if len(chunk.tokens) == length:
                next_chunk()
            match = _match_at(lookup, tokens, position)
            if match is None:
                chunk.tokens.append(token)
                chunk.multipliers.append(weight)
                position += 1
                continue
            ids, name, n_vectors = match
            if len(chunk.tokens) + n_vectors > length:
                next_chunk()
            chunk.fixes.append((len(chunk.tokens), name))
            chunk.tokens += [0] * n_vectors
            chunk.multipliers += [weight] * n_vectors
            position += len(ids)
    if chunk.tokens or not chunks:
        next_chunk(is_last=True)
    return chunks, token_count


def _match_at(lookup, tokens: Sequence[int], offset: int):
    for ids, name, n in lookup.get(tokens[offset], ()):
        if list(tokens[offset : offset + len(ids)]) == ids:
            return ids, name, n
    return None


def target_token_count(token_count: int, chunk_length: int = CHUNK_LENGTH) -> int:
    """Token budget shown by the webui for a prompt of ``token_count`` tokens."""
    return math.ceil(max(token_count, 1) / chunk_length) * chunk_length
