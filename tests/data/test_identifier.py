"""Identifier finder: single-token candidates from the tokenizer, ranked by the base model."""

from __future__ import annotations

import pytest

from dreambooth_kit.data.identifier import COMMON_WORDS, KNOWN_MEANINGS, find_identifiers, single_token_words


def test_candidates_are_single_rare_tokens(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    words = dict(single_token_words(tok))
    assert "zwx" in words and "ohwx" in words
    assert not set(words) & (COMMON_WORDS | set(KNOWN_MEANINGS))  # no "dog", no "sks"
    for word, token_id in words.items():
        assert tok.tokenize(word) == [f"{word}</w>"] and tok.convert_tokens_to_ids(f"{word}</w>") == token_id
        assert word.isalpha() and 3 <= len(word) <= 5
    assert "qzxv" not in words  # splits into pieces: never a candidate


@pytest.mark.slow
def test_on_the_toy_model_the_word_it_never_saw_ranks_first(capsys):
    """The toy model was pretrained on captions of its world; "zwx" never appeared in them. Added to
    "a photo of ... ball" it changes the prediction least; the world's own words (sand, box, gray)
    move it more, and the class noun itself is not offered."""
    from dreambooth_kit.cli import main
    from dreambooth_kit.config import TOY_MODEL, ModelConfig

    found = find_identifiers(ModelConfig(pretrained=TOY_MODEL), "ball", n=20)
    assert found[0].word == "zwx"
    assert [c.change for c in found] == sorted(c.change for c in found)
    assert found[-1].change > 3 * found[0].change
    assert "ball" not in [c.word for c in found]
    assert find_identifiers(ModelConfig(pretrained=TOY_MODEL), "ball", n=20) == found  # deterministic
    assert main(["identifier", "--class", "ball", "--model", TOY_MODEL, "--n", "3"]) == 0
    printed = capsys.readouterr()
    lines = printed.out.splitlines()
    assert "identifier candidates: 100%" in printed.err  # the progress bar over the words scored
    assert lines[2].split()[:2] == ["1", "zwx"] and "a photo of zwx ball" in lines[2]
    assert "sks: a rifle" in lines[-1]
