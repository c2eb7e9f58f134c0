"""Labels: heuristic, a local model, an OpenAI-compatible endpoint served over real HTTP by a
real model, robust parsing, bulk labeling, prompt templates and the detection score."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.errors import Cancelled, UserError
from core.label import (DEFAULT_TEMPLATE, FeatureContext, Label, LocalLabeler, OpenAILabeler, PromptTemplate,
                        detection_score, heuristic_label, label_many, marked, parse_label)

SECRET = "sk-test-very-secret"


def ctx(latent=1, top=(" Paris", " London"), examples=None, pos=None, entities=None):
    return FeatureContext(latent, list(top), examples or ["I moved to<< Paris>> last year", "in<< London>> now"],
                          0.01, "Fires mostly on proper nouns.", [" France"], [" the"], pos or {}, entities or {})


def test_marked_puts_the_max_token_in_brackets():
    assert marked({"tokens": ["a", " b", " c"], "max_index": 1}) == "a<< b>> c"


@pytest.mark.parametrize("c, name, category", [
    (ctx(top=(" the",), examples=["in<< the>> end"] * 5), "token ' the'", "token"),
    (ctx(pos={"PROPN": 4}, entities={"GPE": 4}), "GPE entities", "entity"),
    (ctx(top=("(", ")", "):")), "code punctuation '('", "format/code"),
    (ctx(top=(" run", " walk", " jump"), examples=["a<< run>>", "b<< walk>>"], pos={"VERB": 9, "NOUN": 1}),
     "verbs", "syntax"),
    (ctx(top=(" a", " b"), examples=["x<< a>>", "y<< b>>"]), "a / b", "other"),
    (ctx(top=("\n", "\n\n  "), examples=["x<<\n>>"]), "whitespace and line breaks", "format/code"),
])
def test_heuristic_labels(c, name, category):
    lab = heuristic_label(c)
    assert (lab.name, lab.category, lab.source) == (name, category, "heuristic") and lab.description


@pytest.mark.parametrize("text, want", [
    ('Sure! {"name": "City names", "category": "entity", "description": "Names of cities."} Hope it helps',
     ("City names", "entity", "Names of cities.")),
    ("Name: Closing brackets\nCategory: format/code\nDescription: Ends of calls.", ("Closing brackets", "format/code",
                                                                                    "Ends of calls.")),
    ('{"name": "x", "category": "weird"}', ("x", "other", "")),
    ("  **Past tense verbs**\nmore text", ("Past tense verbs", "other", "")),
])
def test_parsing_model_answers(text, want):
    lab = parse_label(text, "local:m")
    assert (lab.name, lab.category, lab.description) == want and lab.raw == text and lab.source == "local:m"


def test_unusable_answers_are_one_line_errors():
    for text in ("", "   \n  ", "{}"):
        with pytest.raises(UserError, match="returned no usable label|empty label name"):
            parse_label(text, "openai:m")


def test_prompt_templates_round_trip_and_reject_unknown_placeholders():
    t = PromptTemplate("mine", "Be brief.", "Tokens: {top_tokens}\n{examples}")
    assert PromptTemplate.from_json(t.to_json()) == t
    msgs = t.messages(ctx())
    assert msgs[0] == {"role": "system", "content": "Be brief."} and "1. I moved to<< Paris>>" in msgs[1]["content"]
    with pytest.raises(UserError, match="unknown placeholder\\(s\\) colour"):
        PromptTemplate("bad", "", "{colour}")
    with pytest.raises(UserError, match="exactly the string fields"):
        PromptTemplate.from_json('{"name": "x", "user": "y"}')
    assert "{examples}" in DEFAULT_TEMPLATE.user


# ---------------------------------------------------------------------- a real OpenAI-compatible server

class _Handler(BaseHTTPRequestHandler):
    labeler = None
    seen_auth: list = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _Handler.seen_auth.append(self.headers.get("Authorization"))
        if self.path.startswith("/broken"):
            self.send_response(500)
            self.end_headers()
            return
        if self.path.startswith("/garbage"):
            out = b"<html>not json</html>"
        else:
            text = _Handler.labeler.complete(body["messages"])[: 4 * body.get("max_tokens", 200)]
            out = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture(scope="module")
def server(tiny_llama, tiny_tokenizer):
    _Handler.labeler = LocalLabeler(tiny_llama, tiny_tokenizer, "tiny", max_new_tokens=12)
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_openai_endpoint_over_http(server, tiny_llama, tiny_tokenizer):
    """The tiny random model writes gibberish; parsing still yields a label (first line), the
    key travels as a Bearer header and is never shown."""
    remote = OpenAILabeler(server + "/v1", "tiny", api_key=SECRET)
    local = LocalLabeler(tiny_llama, tiny_tokenizer, "tiny", max_new_tokens=12)
    raw = local.complete(DEFAULT_TEMPLATE.messages(ctx()))
    assert remote.complete(DEFAULT_TEMPLATE.messages(ctx())) == raw[: 4 * 200]
    assert _Handler.seen_auth[-1] == f"Bearer {SECRET}"
    assert SECRET not in repr(remote)
    if raw.strip(" \"'*#-{}\n"):
        assert remote.label(ctx()).source == "openai:tiny"


@pytest.mark.parametrize("path, message", [("/broken", "answered HTTP 500"), ("/garbage", "not a chat completion")])
def test_endpoint_errors_are_one_line_without_the_key(server, path, message):
    with pytest.raises(UserError) as e:
        OpenAILabeler(server + path, "m", api_key=SECRET).label(ctx())
    assert message in str(e.value) and SECRET not in str(e.value) and "\n" not in str(e.value)


def test_endpoint_down_and_bad_url(monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(UserError, match=f"labeling endpoint http://127.0.0.1:{port}/v1 is unreachable"):
        OpenAILabeler(f"http://127.0.0.1:{port}/v1", "m", timeout=5).label(ctx())
    with pytest.raises(UserError, match="is not an http"):
        OpenAILabeler("127.0.0.1:8000", "m")
    monkeypatch.setenv("MISTUDIO_LABEL_API_KEY", "from-env")
    assert OpenAILabeler("http://x/v1", "m")._key == "from-env"


def test_label_many_goes_past_failures_and_cancels():
    class Flaky:
        def label(self, c, template):
            if c.latent == 2:
                raise UserError("the labeling model returned no usable label")
            return Label(f"f{c.latent}", source="local:x")

    seen = []
    labels, errors = label_many(Flaky(), [ctx(i) for i in range(4)], progress=seen.append)
    assert sorted(labels) == [0, 1, 3] and errors == {2: "the labeling model returned no usable label"}
    assert [p["done"] for p in seen] == [1, 2, 3, 4] and seen[-1]["failed"] == 1
    heur, _ = label_many(None, [ctx(7)])
    assert heur[7].source == "heuristic"
    with pytest.raises(Cancelled):
        label_many(Flaky(), [ctx(0)], should_cancel=lambda: True)


def test_detection_counts(tiny_llama, tiny_tokenizer):
    scorer = LocalLabeler(tiny_llama, tiny_tokenizer)
    res = detection_score(scorer, Label("cities", description="city names"), ["Paris", "Rome"], ["x = 1"])
    assert res.n == 3 and res.true_positives + res.false_negatives == 2 and res.true_negatives + res.false_positives == 1
    assert 0 <= res.balanced_accuracy <= 1
    with pytest.raises(UserError, match="needs both"):
        detection_score(scorer, Label("x"), [], ["y"])


@pytest.mark.slow
def test_smollm2_labels_and_detects(smollm2_dir):
    """The embedded SmolLM2 writes a label offline through its chat template; its detection score
    on a clear feature is computed (SmolLM2-135M is weak: the figure is reported, and the counts
    are checked)."""
    from core.models import load_model

    model, tok = load_model(smollm2_dir)
    labeler = LocalLabeler(model, tok, "smollm2", max_new_tokens=60)
    c = ctx(examples=["I moved to<< Paris>> last year", "We flew to<< London>> in May", "She lives in<< Rome>>",
                      "The trip to<< Berlin>> was long"])
    lab = labeler.label(c)
    assert lab.name and lab.source == "local:smollm2" and lab.category in (
        "token", "morphology", "syntax", "semantic", "entity", "format/code", "position", "other")
    res = detection_score(labeler, Label("city names", description="names of cities"),
                          ["I moved to Paris", "We flew to London", "She lives in Rome"],
                          ["x = f(y) + 1", "for i in range(10):", "return None"])
    assert res.n == 6 and res.true_positives + res.false_negatives == 3
    print(f"SmolLM2 label: {lab.name!r} ({lab.category}); detection balanced accuracy {res.balanced_accuracy:.2f}")
