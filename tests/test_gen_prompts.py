from __future__ import annotations

import pytest

from medical_diffusion.errors import MedDiffError
from medical_diffusion.generation.prompts import (
    build_prompt,
    check_token_budget,
    format_weight,
    get_multicond_prompt_list,
    parse_composable,
)

# (prompt, expected parts) worked out by hand from A1111's re_AND / re_weight
PARSER_TABLE = [
    ("prostate_neg", [("prostate_neg", 1.0)]),
    ("prostate_neg :0.25 AND prostate_pos :0.75", [("prostate_neg", 0.25), (" prostate_pos", 0.75)]),
    ("a:2 AND b", [("a", 2.0), (" b", 1.0)]),
    ("a : -1.5 AND b:+0.5", [("a", -1.5), (" b", 0.5)]),
    ("a :.5", [("a", 0.5)]),
    ("a :5.", [("a", 5.0)]),
    ("cats and dogs", [("cats and dogs", 1.0)]),  # lowercase and does not split
    ("cats And dogs", [("cats And dogs", 1.0)]),
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),  # whole word only
    ("a ANDb", [("a ANDb", 1.0)]),
    ("a AND  ", [("a", 1.0), ("", 1.0)]),
    ("healthy :30%", [("healthy :30%", 1.0)]),  # A1111 does not accept percentages
    ("x :1e-3", [("x :1e-3", 1.0)]),  # nor exponents
    ("a: 0.3 AND b :0.7   ", [("a", 0.3), (" b", 0.7)]),
    ("(word:1.2) thing", [("(word:1.2) thing", 1.0)]),  # attention syntax is not a part weight
    ("ratio 1:2", [("ratio 1", 2.0)]),  # A1111 reads a trailing :number as the weight
    ("a\nAND\nb :3", [("a", 1.0), ("\nb", 3.0)]),
]


@pytest.mark.parametrize("prompt,expected", PARSER_TABLE)
def test_parser_matches_a1111_table(prompt, expected):
    assert parse_composable(prompt) == expected


def test_multicond_list_deduplicates_texts_like_a1111():
    res, flat, index = get_multicond_prompt_list(["a AND b :0.5", "b:2 AND c"])
    assert flat == ["a", " b", "b", " c"]
    assert res == [[(0, 1.0), (1, 0.5)], [(2, 2.0), (3, 1.0)]]
    res, flat, _ = get_multicond_prompt_list(["a AND b :2 AND b"])
    assert flat == ["a", " b"] and res == [[(0, 1.0), (1, 2.0), (1, 1.0)]]


def test_builder_round_trips_and_writes_decimals():
    parts = [("prostate_neg", 0.25), ("prostate_pos", 0.75)]
    prompt = build_prompt(parts)
    assert prompt == "prostate_neg :0.25 AND prostate_pos :0.75"
    assert [(t.strip(), w) for t, w in parse_composable(prompt)] == parts
    assert build_prompt([("a", 1 / 3), ("b", -0.5), ("c", 2e-7)]) == "a :0.3333 AND b :-0.5 AND c :0"
    assert build_prompt([("only", 1.0)]) == "only"
    assert format_weight(1.0) == "1" and "%" not in format_weight(0.3)
    with pytest.raises(MedDiffError, match="AND"):
        build_prompt([("cats AND dogs", 1.0)])
    with pytest.raises(MedDiffError):
        build_prompt([])


def test_token_budget_64_vector_embedding_leaves_11():
    (budget,) = check_token_budget("prostate_pos", {"prostate_pos": 64})
    assert budget.tokens == 64 and budget.chunks == 1 and budget.tokens_left == 11
    assert budget.embeddings == {"prostate_pos": (0, 11)} and not budget.warnings


def test_token_budget_warns_when_text_pushes_embedding_to_next_chunk():
    prompt = " ".join(["word"] * 20) + " prostate_pos AND prostate_neg"
    first, second = check_token_budget(prompt, {"prostate_pos": 64, "prostate_neg": 64})
    assert first.chunks == 2 and first.embeddings["prostate_pos"] == (1, 11)
    assert any("does not fit" in w for w in first.warnings)
    assert any("more than one 75-token chunk" in w for w in first.warnings)
    assert second.chunks == 1 and not second.warnings


def test_token_budget_uses_given_tokenizer():
    (b,) = check_token_budget("emb a b", {"emb": 10}, count_tokens=lambda text: 3 * len(text.split()))
    assert b.tokens == 16 and b.tokens_left == 59


def test_prompt_warnings_flag_budget_and_parts_without_embeddings():
    import torch

    from medical_diffusion.generation.loading import prompt_warnings
    from medical_diffusion.generation.prompts import UnknownEmbeddingError
    from test_gen_fake_backend import FakeBackend

    fb = FakeBackend()
    vectors = {"prostate_pos": torch.zeros(64, 16), "prostate_neg": torch.zeros(64, 16)}
    assert prompt_warnings(fb, "prostate_neg :0.25 AND prostate_pos :0.75", vectors) == []
    with pytest.raises(UnknownEmbeddingError, match="unknown embedding name.s. prostate_poss .did you mean prostate_pos"):
        prompt_warnings(fb, "prostate_neg AND prostate_poss", vectors)
    typo = prompt_warnings(fb, "prostate_neg AND prostate_poss", vectors, allow_plain=True)
    assert len(typo) == 1 and "'prostate_poss' uses none of the loaded embeddings" in typo[0]
    long = prompt_warnings(fb, "an axial t2 weighted mri slice of the large male prostate gland prostate_pos", vectors)
    assert any("does not fit" in w for w in long)
    pct = prompt_warnings(fb, "prostate_neg :70% AND prostate_pos :30%", vectors)
    assert any("write :0.3" in w for w in pct) and any("write :0.7" in w for w in pct)
