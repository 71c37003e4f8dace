"""A1111 composable prompts: ``"a :0.25 AND b :0.75"``, a prompt builder and a token-budget check.

The parser reproduces ``modules/prompt_parser.py::get_multicond_prompt_list`` of the
AUTOMATIC1111 webui exactly: parts are split on the whole uppercase word ``AND``, each part may
end with ``:weight`` (signed decimal, default 1). Lowercase ``and`` does not split, ``30%`` is
not a weight.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

from medical_diffusion.errors import MedDiffError

#: copied semantics of A1111's ``re_AND`` / ``re_weight``
RE_AND = re.compile(r"\bAND\b")
RE_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

#: CLIP tokens per A1111 prompt chunk (77 minus start/end tokens)
CHUNK_TOKENS = 75


def parse_composable(prompt: str) -> list[tuple[str, float]]:
    """``(text, weight)`` for each ``AND``-separated part, in order (text exactly as A1111 keeps it)."""
    parts = []
    for sub in RE_AND.split(prompt):
        match = RE_WEIGHT.search(sub)
        text, weight = match.groups() if match is not None else (sub, None)
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


def get_multicond_prompt_list(prompts: Sequence[str]) -> tuple[list[list[tuple[int, float]]], list[str], dict[str, int]]:
    """A1111's function: per prompt ``[(index into flat list, weight)]``, the flat list of unique
    texts, and text -> index."""
    res_indexes: list[list[tuple[int, float]]] = []
    flat: list[str] = []
    index_of: dict[str, int] = {}
    for prompt in prompts:
        indexes = []
        for text, weight in parse_composable(prompt):
            index = index_of.get(text)
            if index is None:
                index = len(flat)
                flat.append(text)
                index_of[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, flat, index_of


def format_weight(weight: float, decimals: int = 4) -> str:
    """A decimal A1111's weight pattern accepts (no exponent, no ``%``), trailing zeros dropped."""
    if not math.isfinite(weight):
        raise MedDiffError(f"prompt weight must be a finite number, got {weight}")
    text = f"{weight:.{decimals}f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text


def build_prompt(parts: Sequence[tuple[str, float]], decimals: int = 4) -> str:
    """``[(text or embedding name, weight)]`` -> ``"a :0.25 AND b :0.75"``.

    A single part of weight 1 is written as plain text. Texts must not contain the word ``AND``
    (it would split the part) nor be empty.
    """
    if not parts:
        raise MedDiffError("a prompt needs at least one part")
    cleaned = []
    for text, weight in parts:
        text = str(text).strip()
        if not text:
            raise MedDiffError("prompt part is empty")
        if RE_AND.search(text):
            raise MedDiffError(f"prompt part {text!r} contains the word AND, which would split it")
        cleaned.append((text, float(weight)))
    if len(cleaned) == 1 and cleaned[0][1] == 1.0:
        return cleaned[0][0]
    return " AND ".join(f"{text} :{format_weight(weight, decimals)}" for text, weight in cleaned)


# -- token budget ---------------------------------------------------------------------------

@dataclass
class PartBudget:
    """How one composable part fills A1111's 75-token chunks."""

    text: str
    tokens: int  # tokens used, including embedding vectors
    chunks: int
    #: name -> (chunk index, tokens left in that chunk after the whole part is placed)
    embeddings: dict[str, tuple[int, int]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def tokens_left(self) -> int:
        """Free tokens in the last chunk."""
        return self.chunks * CHUNK_TOKENS - self.tokens


def _name_pattern(names: Sequence[str], flags: int = 0) -> re.Pattern | None:
    if not names:
        return None
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])({alternatives})(?![\w-])", flags)


def names_used(prompts: Sequence[str], names: Iterable[str]) -> list[str]:
    """The ``names`` that stand as a whole word in any of ``prompts`` (any case, as
    :func:`parts_without_embeddings` finds them), sorted; one pattern for all names."""
    names = list(names)
    pattern = _name_pattern(names, re.IGNORECASE)
    if pattern is None:
        return []
    by_lower = {name.lower(): name for name in names}
    return sorted({by_lower[m.group(1).lower()] for prompt in prompts for m in pattern.finditer(prompt or "")})


def estimate_text_tokens(text: str) -> int:
    """Rough CLIP token count when no tokenizer is at hand: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


def check_token_budget(
    prompt: str,
    embedding_lengths: Mapping[str, int],
    count_tokens: Callable[[str], int] | None = None,
) -> list[PartBudget]:
    """Place every part of ``prompt`` into 75-token chunks the way A1111 does.

    ``embedding_lengths`` maps an embedding name to its number of vectors; ``count_tokens`` counts
    the CLIP tokens of plain text (default: a rough word count). As in A1111, an embedding never
    straddles two chunks: it moves to a fresh chunk when it does not fit. Each part gets warnings
    when it needs more than one chunk or an embedding was pushed into a new chunk.
    """
    count = count_tokens or estimate_text_tokens
    pattern = _name_pattern(list(embedding_lengths))
    budgets = []
    for text, _weight in parse_composable(prompt):
        pieces: list[tuple[str, str]] = []  # ("text"|"emb", value)
        pos = 0
        for m in pattern.finditer(text) if pattern else ():
            pieces.append(("text", text[pos : m.start()]))
            pieces.append(("emb", m.group(1)))
            pos = m.end()
        pieces.append(("text", text[pos:]))
        used: list[int] = [0]  # tokens in each chunk so far
        emb_places: dict[str, int] = {}
        warnings = []

        def add(n: int) -> None:
            while n > 0:
                if used[-1] == CHUNK_TOKENS:
                    used.append(0)
                take = min(n, CHUNK_TOKENS - used[-1])
                used[-1] += take
                n -= take

        for kind, value in pieces:
            if kind == "text":
                add(count(value) if value.strip() else 0)
                continue
            n = int(embedding_lengths[value])
            if n > CHUNK_TOKENS:
                warnings.append(f"embedding {value!r} has {n} vectors, more than a {CHUNK_TOKENS}-token chunk holds")
            elif used[-1] + n > CHUNK_TOKENS:
                warnings.append(
                    f"embedding {value!r} ({n} vectors) does not fit in the {CHUNK_TOKENS - used[-1]} tokens left "
                    f"in chunk {len(used)}; A1111 moves it to a new chunk and pads the previous one"
                )
                used[-1] = CHUNK_TOKENS
            if used[-1] == CHUNK_TOKENS:
                used.append(0)
            emb_places[value] = len(used) - 1
            add(n)
        chunks = len(used) if used[-1] > 0 or len(used) == 1 else len(used) - 1
        total = sum(used)
        left_in = {name: (c, CHUNK_TOKENS - used[c]) for name, c in emb_places.items()}
        if chunks > 1:
            warnings.append(
                f"part {text.strip()!r} uses {total} tokens: more than one {CHUNK_TOKENS}-token chunk "
                f"({chunks} chunks); the embedding was trained alone in one chunk, so extra words may weaken it"
            )
        budgets.append(PartBudget(text=text, tokens=total, chunks=chunks, embeddings=left_in, warnings=warnings))
    return budgets


def budget_warnings(budgets: Sequence[PartBudget]) -> list[str]:
    """All warnings of a token-budget check, flattened."""
    return [w for b in budgets for w in b.warnings]


# -- embedding names ------------------------------------------------------------------------

#: how a refusal tells the user to sample a prompt without embeddings on purpose
PLAIN_PROMPT_HINT = "pass --allow-plain-prompt to sample a prompt without embeddings"


class UnknownEmbeddingError(MedDiffError):
    """A prompt part names none of the loaded embeddings (a misspelt name, or a plain-text prompt)."""

    def __init__(self, message: str, parts: Sequence[str]):
        super().__init__(message)
        self.parts = list(parts)


def parts_without_embeddings(prompt: str, names: Sequence[str]) -> list[str]:
    """The non-empty composable parts of ``prompt`` (weights stripped) that use none of ``names``.

    A name counts as used where it stands as a whole word (not inside ``a_b`` or ``a-b``), in any
    case: the CLIP tokenizer lowercases the prompt before the embedding lookup.
    """
    pattern = _name_pattern(list(names), re.IGNORECASE)
    found = []
    for text, _weight in parse_composable(prompt):
        text = text.strip()
        if text and (pattern is None or not pattern.search(text)):
            found.append(text)
    return found


def check_prompt_embeddings(
    prompts: Sequence[str], names: Sequence[str], where: str, allow_plain: bool = False,
    plain_hint: str = PLAIN_PROMPT_HINT,
) -> None:
    """Refuse prompts with a part that uses none of the loaded embeddings ``names``.

    The :class:`UnknownEmbeddingError` lists those parts (with a close name where one exists), where
    the embeddings were looked for (``where``) and what was found. ``allow_plain`` lets plain-text
    parts through (an explicit opt-in; ``plain_hint`` says how to give it).
    """
    if allow_plain:
        return
    import difflib

    names = sorted(set(names))
    bad: list[str] = []
    for prompt in prompts:
        bad += [p for p in parts_without_embeddings(prompt, names) if p not in bad]
    if not bad:
        return
    lowered = {n.lower(): n for n in names}

    def shown(part: str) -> str:
        close = difflib.get_close_matches(part.lower(), list(lowered), n=1, cutoff=0.75)
        return f"{part} (did you mean {lowered[close[0]]}?)" if close else part

    raise UnknownEmbeddingError(
        f"unknown embedding name(s) {', '.join(shown(p) for p in bad)}: "
        f"{'this prompt part uses' if len(bad) == 1 else 'these prompt parts use'} none of the loaded embeddings; "
        f"looked in {where}; found: {', '.join(names) or 'none'}. Check the spelling and the folder, or "
        f"{plain_hint}",
        bad,
    )
