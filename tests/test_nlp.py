"""NLP analysis of max-activating contexts with the packaged spaCy model."""

import pytest

from core.nlp import analyze, load_spacy


def ex(tokens, max_index):
    return {"tokens": tokens, "max_index": max_index, "acts": [0.0] * len(tokens)}


def test_words_rebuilt_from_subwords_with_pos_entities_and_ngrams():
    examples = [
        ex([" I", " moved", " to", " Par", "is", " last", " year"], 3),       # "Par|is": the word Paris
        ex([" She", " flew", " to", " London", " in", " May"], 3),
        ex([" We", " drove", " to", " Berlin", " yesterday"], 3),
        ex([" The", " cat", " sat", " on", " the", " mat"], 1),
    ]
    s = analyze(examples)
    assert s.n_examples == 4
    assert s.pos.get("PROPN", 0) == 3 and s.pos.get("NOUN", 0) == 1
    assert s.entities.get("GPE") == 3 and "Paris" in s.entity_texts
    assert ["paris", 1] in s.words and ["london", 1] in s.words
    assert s.before[0] == ["to", 3]
    assert "proper nouns (75%)" in s.summary and "after 'to'" in s.summary and "GPE" in s.summary
    assert s.to_dict()["pos"] == s.pos


def test_robust_to_empty_odd_and_missing_windows():
    s = analyze([ex(["", "\n", " def", " f", "():"], 2), ex([], 0), ex([" x"], 5)])
    assert s.n_examples == 1 and sum(s.pos.values()) == 1
    assert analyze([]).summary == "No contexts to analyse."


def test_the_model_loads_offline_once():
    assert load_spacy() is load_spacy()
