"""Labels: heuristic rules, answer parsing (on answers SmolLM2-135M really wrote), prompt
templates, a local model, an OpenAI-compatible endpoint served over real HTTP by a real model,
bulk labeling, and the detection score."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from core.errors import Cancelled, UserError
from core.interp import (CATEGORIES, DEFAULT_TEMPLATE, EndpointUnreachable, FeatureContext, Label, LocalLabeler,
                         OpenAILabeler, PromptTemplate, detection_score, heuristic_label, label_many, marked,
                         parse_label)
from core.interp.clients.local import _json_closed

SECRET = "sk-test-very-secret-1234"

CITY_EXAMPLES = ["I moved to<< Paris>> last year", "We flew to<< London>> in May", "She lives in<< Rome>> now",
                 "The trip to<< Berlin>> was long"]
CITY_TEXTS = ["I moved to Paris last year", "We flew to London in May", "She lives in Rome now",
              "The trip to Berlin was long"]
CODE_TEXTS = ["x = f(y) + 1", "for i in range(10):", "return None", "def main(args):"]


def ctx(latent=1, top=(" Paris", " London"), examples=None, pos=None, entities=None, summary="Fires on places."):
    return FeatureContext(latent, list(top), list(examples or CITY_EXAMPLES[:2]), 0.01, summary, [" France"],
                          [" the"], pos or {}, entities or {})


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    """Two cores shared with other jobs: torch on one thread avoids OpenMP oversubscription."""


def test_marked_puts_the_max_token_in_brackets():
    assert marked({"tokens": ["a", " b", " c"], "max_index": 1}) == "a<< b>> c"
    assert marked({"tokens": ["a", None], "max_index": 1}) == "a<<>>"
    assert marked({"tokens": ["a"], "max_index": 3}) == "a"


# ---------------------------------------------------------------------- heuristic


@pytest.mark.parametrize("c, name, category", [
    (ctx(top=(" the",), examples=["in<< the>> end"] * 5), "token ' the'", "token"),
    (ctx(top=(" the", " a"), examples=["in<< the>> end"] * 4 + ["a<< a>>"]), "token ' the'", "token"),
    (ctx(pos={"PROPN": 4}, entities={"GPE": 4}), "place names (GPE)", "entity"),
    (ctx(top=("(", "()", "):")), "code punctuation (", "format/code"),
    (ctx(top=(".", ",")), "punctuation .", "syntax"),
    (ctx(top=("ing", "ings"), examples=["runn<<ing>> fast", "build<<ings>> here", "walk<<ing>> home"]),
     "word piece -ing", "morphology"),
    (ctx(top=(" run", " walk", " jump"), examples=["a<< run>>", "b<< walk>>"], pos={"VERB": 9, "NOUN": 1}),
     "verbs", "syntax"),
    (ctx(top=(" a", " b"), examples=["x<< a>>", "y<< b>>"]), "a / b", "other"),
    (ctx(top=("\n", "\n\n  "), examples=["x<<\n>>"]), "whitespace and line breaks", "format/code"),
])
def test_heuristic_labels(c, name, category):
    lab = heuristic_label(c)
    assert (lab.name, lab.category, lab.source) == (name, category, "heuristic")
    assert lab.description and len(lab.name.split()) <= 5 and lab.category in CATEGORIES
    assert c.nlp_summary in lab.description  # the NLP sentence travels with the label


# ---------------------------------------------------------------------- parsing

# Answers SmolLM2-135M-Instruct wrote for the default template (after its '{"name": "' prefix) and
# for earlier prompts while the template was tuned: broken JSON, repeated keys, cut-off answers, prose.
REAL_ANSWERS = [
    ('{"name": "I", "category": "Morphology", "description": "Morphological structure of the token", '
     '"category": "Sentence", "description": "Morphological structure of the token"}',
     ("I", "other", "Morphological structure of the token")),  # JSON keeps the last of repeated keys
    ('{"name": "the", "category": "morphology", "description": "the", "token": "the", "token": "the", '
     '"category": "semantic", "token": "the", "token": "the", "category": "other", "token": "the",',
     ("the", "morphology", "the")),  # cut off: the first of each key
    ('{"name": "opening parenthesis", "category": "format/code", "description": "The ( that starts a call.")}',
     ("opening parenthesis", "format/code", "The ( that starts a call.")),
    ('{"name": "A", "category": "One of token, morphology, syntax, semantic, entity, format/code, position, other", '
     '"description": "A single sentence"}', ("A", "other", "A single sentence")),  # echoed the list: no category
    ('{"name": "Lingua-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101-101',
     ("Lingua-101-101-101-101-101-101-101-101-101-101-101-101-101-1", "other", "")),
    ('The feature is named "Lemmon" and it is a token that is used to mark the end of a sentence.',
     ("Lemmon", "other", "The feature is named \"Lemmon\" and it is a token that is used to mark the end of a "
                         "sentence.")),
    ("The tokens marked <<like this>> in these texts are a mix of punctuation and punctuation marks.",
     ("The tokens marked <<like this>>", "other",
      "The tokens marked <<like this>> in these texts are a mix of punctuation and punctuation marks.")),
    ('{"name": "Paris", "category": "Miscellaneous", "description": "Paris"}', ("Paris", "other", "Paris")),
]


@pytest.mark.parametrize("text, want", REAL_ANSWERS)
def test_parsing_real_small_model_answers(text, want):
    lab = parse_label(text, "local:m")
    assert (lab.name, lab.category, lab.description) == want and lab.raw == text and lab.source == "local:m"
    assert len(lab.name.split()) <= 5 and len(lab.name) <= 60


@pytest.mark.parametrize("text, want", [
    ('Sure! {"name": "City names", "category": "entity", "description": "Names of cities."} Hope it helps',
     ("City names", "entity", "Names of cities.")),
    ('```json\n{"Name": "Closing brace }", "Category": "Code", "explanation": "Ends a block."}\n```',
     ("Closing brace }", "format/code", "Ends a block.")),
    ("Name: Closing brackets\nCategory: format/code\nDescription: Ends of calls.",
     ("Closing brackets", "format/code", "Ends of calls.")),
    ("**Name:** Past tense verbs\n**Category:** Syntax\n**Description:** Verbs in the past.",
     ("Past tense verbs", "syntax", "Verbs in the past.")),
    ('{"name": "x", "category": "weird"}', ("x", "other", "")),
    ("  **Past tense verbs**\nmore text", ("Past tense verbs", "other", "")),
    ('{"name": "a very long name that goes on and on", "category": "semantic"}', ("a very long name that",
                                                                                  "semantic", "")),
])
def test_parsing_well_formed_and_loose_answers(text, want):
    lab = parse_label(text, "openai:m")
    assert (lab.name, lab.category, lab.description) == want


@pytest.mark.parametrize("text", ["", "   \n  ", "{}", '{"name": ""}', '{"name": "  ", "category": "token"}',
                                  "!!! ???", "Name:\nCategory: token"])
def test_unusable_answers_are_one_line_errors(text):
    with pytest.raises(UserError, match=r"^the labeling model \(openai:m\) returned no usable label") as e:
        parse_label(text, "openai:m")
    assert "\n" not in str(e.value)


def test_json_closed_ignores_braces_in_strings():
    assert _json_closed('{"name": "a } b", "x": {"y": 1}} chatter')
    assert not _json_closed('{"name": "a } b", "x": {"y": 1}')
    assert not _json_closed('{"name": "unterminated }')
    assert not _json_closed("no json here")


# ---------------------------------------------------------------------- prompt templates


def test_prompt_templates_round_trip_and_render():
    t = PromptTemplate("mine", "Be brief.", "Tokens: {top_tokens}\n{examples}\nPromotes {promoted}", '{"name": "')
    assert PromptTemplate.from_json(t.to_json()) == t
    msgs = t.messages(ctx())
    assert msgs[0] == {"role": "system", "content": "Be brief."}
    assert msgs[1]["content"] == ("Tokens: ' Paris', ' London'\n1. I moved to<< Paris>> last year\n"
                                  "2. We flew to<< London>> in May\nPromotes ' France'")
    assert PromptTemplate("no-system", "", "{latent}").messages(ctx(latent=5)) == [{"role": "user", "content": "5"}]
    # saved before answer_prefix existed
    old = PromptTemplate.from_json('{"name": "old", "system": "s", "user": "u {examples}"}')
    assert old.answer_prefix == "" and PromptTemplate(**json.loads(old.to_json())) == old
    assert {"{examples}", "{top_tokens}"} <= {p for p in ("{examples}", "{top_tokens}") if p in DEFAULT_TEMPLATE.user}
    assert PromptTemplate.from_json(DEFAULT_TEMPLATE.to_json()) == DEFAULT_TEMPLATE


@pytest.mark.parametrize("make, message", [
    (lambda: PromptTemplate("bad", "", "{colour}"), r"unknown placeholder\(s\) 'colour'; allowed: examples"),
    (lambda: PromptTemplate("bad", "{examples", "u"), "is malformed"),
    (lambda: PromptTemplate.from_json('{"name": "x", "user": "y"}'), "needs the string fields name, system, user"),
    (lambda: PromptTemplate.from_json('{"name": "x", "system": "", "user": "y", "extra": ""}'), "got: extra, name"),
    (lambda: PromptTemplate.from_json('{"name": "x", "system": 1, "user": "y"}'), "needs the string fields"),
    (lambda: PromptTemplate.from_json('["name"]'), "got: list"),
    (lambda: PromptTemplate.from_json("{name: x}"), "is not JSON"),
])
def test_bad_templates_are_one_line_errors(make, message):
    with pytest.raises(UserError, match=message) as e:
        make()
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- a local model


@pytest.fixture(scope="module")
def tiny(tiny_llama, tiny_tokenizer):
    return LocalLabeler(tiny_llama, tiny_tokenizer, "tiny", max_new_tokens=12)


def test_local_labeler_writes_after_the_answer_prefix(tiny):
    """The random tiny model writes gibberish; what matters is that it continues the prefix
    greedily (deterministic) and the answer is parsed or refused in one line."""
    raw = tiny.complete(DEFAULT_TEMPLATE.messages(ctx()), DEFAULT_TEMPLATE.answer_prefix)
    assert raw.startswith('{"name": "') and raw == tiny.complete(DEFAULT_TEMPLATE.messages(ctx()), '{"name": "')
    try:
        lab = tiny.label(ctx())
        assert lab.source == "local:tiny" and lab.raw.startswith('{"name": "') and lab.name
    except UserError as e:
        assert "returned no usable label" in str(e)
    assert repr(tiny) == "LocalLabeler('local:tiny', max_new_tokens=12)"


def test_chat_templates_without_a_system_role_get_it_in_the_user_message(tiny_llama, tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not "
                         "supported') }}{% endif %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    gemma_like = LocalLabeler(tiny_llama, tok, "t")
    text = gemma_like.prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name it."}], "{")
    assert text == "<user>Be brief.\n\nName it.\n<assistant>{"
    assert gemma_like.complete([{"role": "user", "content": "hi"}], "{").startswith("{")


def test_local_prompt_is_trimmed_to_the_models_context(tiny):
    """The tiny Llama has 512 positions and a byte tokenizer: ten long examples do not fit."""
    big = ctx(examples=[f"example number {i} is a rather long window of text<< here>> and more" for i in range(10)])
    fitted = tiny._fit(big, PromptTemplate("short", "", "{examples}"))
    n = len(tiny._encode(tiny.prompt(PromptTemplate("short", "", "{examples}").messages(fitted))))
    assert 1 <= len(fitted.examples) < 10 and n + tiny.max_new_tokens <= 512
    assert fitted.examples == big.examples[:len(fitted.examples)]  # the best examples are kept


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_tokenizer):
    """GPT-2 learns absolute positions (Llama's rotary ones are shift-invariant): left padding
    shows there unless positions are given."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tiny_tokenizer), n_positions=256)
    return LocalLabeler(GPT2LMHeadModel(cfg).eval(), tiny_tokenizer, "gpt2")


@pytest.mark.parametrize("which", ["tiny", "tiny_gpt2"])
def test_yes_margins_batched_equal_one_at_a_time(which, request):
    tiny = request.getfixturevalue(which)
    prompts = [[{"role": "user", "content": f"Text: {t}\n\nIs this about a city? Answer Yes or No."}]
               for t in ["Paris", "a much longer text about London and its bridges", "x = 1"]]
    batched = tiny.yes_margins(prompts, batch_size=3)
    single = [tiny.yes_margins([p])[0] for p in prompts]
    assert torch.allclose(torch.tensor(batched), torch.tensor(single), atol=1e-4)
    assert len(set(round(m, 4) for m in batched)) == 3  # different prompts, different margins
    assert tiny.says_yes(prompts[0]) == (single[0] > 0)


# ---------------------------------------------------------------------- an OpenAI-compatible server


class ChatServer(BaseHTTPRequestHandler):
    """/v1/chat/completions backed by a real model (greedy text, or top-5 next-token logprobs when
    asked with max_tokens 1); other path prefixes misbehave on purpose."""

    labeler: LocalLabeler = None
    seen: list = []

    def log_message(self, *args):
        pass

    def _send(self, code, body: bytes, ctype="application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        auth = self.headers.get("Authorization")
        ChatServer.seen.append({"path": self.path, "auth": auth, "body": body})
        path = self.path.split("?")[0]
        route = path.split("/v1/")[0]
        if not path.endswith("/v1/chat/completions"):
            return self._send(404, b'{"error": {"message": "no such route"}}')
        if route == "/broken":  # a server error that echoes the key, as some proxies do
            return self._send(500, json.dumps({"error": {"message": f"boom, you sent {auth}"}}).encode())
        if route == "/garbage":
            return self._send(200, b"<html>not json</html>", "text/html")
        if route == "/empty":
            return self._send(200, b'{"choices": []}')
        if route == "/nocontent":
            return self._send(200, b'{"choices": [{"message": {"role": "assistant"}}]}')
        if route == "/auth" and auth != f"Bearer {SECRET}":
            return self._send(401, b'{"error": {"message": "Incorrect API key provided"}}')
        if route == "/nologprobs" and "logprobs" in body:
            return self._send(400, b'{"error": {"message": "logprobs are not supported"}}')
        if route == "/fixed":  # a well-formed logprobs answer, to check how it is read
            top = [{"token": "Yes", "logprob": -0.1}, {"token": " No", "logprob": -2.4},
                   {"token": "yes", "logprob": -5}]
            return self._send(200, json.dumps({"choices": [{"message": {"content": "Yes"}, "logprobs": {
                "content": [{"token": "Yes", "logprob": -0.1, "top_logprobs": top}]}}]}).encode())
        message, logprobs = self._answer(body)
        choice = {"index": 0, "message": {"role": "assistant", "content": message}, "finish_reason": "stop"}
        if logprobs is not None:
            choice["logprobs"] = {"content": [{"token": message, "logprob": logprobs[0]["logprob"],
                                               "top_logprobs": logprobs}]}
        self._send(200, json.dumps({"object": "chat.completion", "choices": [choice]}).encode())

    def _answer(self, body):
        lab = ChatServer.labeler
        if body.get("max_tokens") != 1:
            return lab.complete(body["messages"]), None
        ids = torch.tensor([lab._encode(lab.prompt(body["messages"]))])
        with torch.no_grad():
            lp = lab.model(ids).logits[0, -1].float().log_softmax(-1)
        values, idx = lp.topk(int(body.get("top_logprobs") or 1))
        top = [{"token": lab.tokenizer.decode([int(i)]), "logprob": float(v)} for v, i in zip(values, idx)]
        return top[0]["token"], (top if body.get("logprobs") else None)


def _serve(labeler):
    ChatServer.labeler = labeler
    srv = ThreadingHTTPServer(("127.0.0.1", 0), ChatServer)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture(scope="module")
def server(tiny):
    srv, url = _serve(tiny)
    yield url
    srv.shutdown()
    srv.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: nothing listens there


def test_openai_labeler_over_http_sends_the_key_as_bearer_only(server, tiny):
    remote = OpenAILabeler(server + "/v1", "tiny", api_key=SECRET, max_tokens=50)
    raw = tiny.complete(DEFAULT_TEMPLATE.messages(ctx()))
    assert remote.complete(DEFAULT_TEMPLATE.messages(ctx())) == raw  # the same model answers, over HTTP
    req = ChatServer.seen[-1]
    assert req["auth"] == f"Bearer {SECRET}" and req["path"] == "/v1/chat/completions"
    assert req["body"]["model"] == "tiny" and req["body"]["temperature"] == 0 and req["body"]["max_tokens"] == 50
    assert SECRET not in json.dumps(req["body"])
    assert SECRET not in repr(remote) and "key=set" in repr(remote)
    try:
        assert remote.label(ctx()).source == "openai:tiny"
    except UserError as e:  # the tiny model's gibberish may hold no word at all
        assert "returned no usable label" in str(e) and SECRET not in str(e)
    hi = [{"role": "user", "content": "hi"}]
    for url in (server + "/v1/chat/completions/", server + "/v1?api-version=2"):  # a full URL, a query: both work
        assert OpenAILabeler(url, "tiny").complete(hi) == tiny.complete(hi)
    assert ChatServer.seen[-1]["path"] == "/v1/chat/completions?api-version=2"


def test_the_key_comes_from_the_argument_then_the_environment(server, monkeypatch):
    monkeypatch.delenv("MISTUDIO_LABEL_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("MISTUDIO_LABEL_BASE_URL", server + "/v1")
    hi = [{"role": "user", "content": "hi"}]
    OpenAILabeler(server + "/v1", "m").complete(hi, max_tokens=1)
    assert ChatServer.seen[-1]["auth"] is None  # no key: no header
    monkeypatch.setenv("OPENAI_API_KEY", "from-openai-env")
    OpenAILabeler(server + "/v1/", "m").complete(hi, max_tokens=1)  # the same endpoint, spelled differently
    assert ChatServer.seen[-1]["auth"] == "Bearer from-openai-env"
    monkeypatch.setenv("MISTUDIO_LABEL_API_KEY", SECRET)
    monkeypatch.setenv("MISTUDIO_LABEL_BASE_URL", server + "/auth/v1")
    lab = OpenAILabeler(server + "/auth/v1", "m")
    lab.complete(hi, max_tokens=1)  # /auth accepts only SECRET
    assert ChatServer.seen[-1]["auth"] == f"Bearer {SECRET}"
    with pytest.raises(UserError, match=r"answered HTTP 401 \(Incorrect API key provided\); check the API key"):
        OpenAILabeler(server + "/auth/v1", "m", api_key="wrong").complete(hi)


def test_the_environment_key_goes_only_to_its_bound_endpoint(server, monkeypatch):
    """A server's MISTUDIO_LABEL_API_KEY is sent to MISTUDIO_LABEL_BASE_URL only: a base URL a
    user typed (another host, port, path or scheme) gets no Authorization header at all."""
    from actors.jobs.label import secrets
    from core.interp import environment_key

    hi = [{"role": "user", "content": "hi"}]
    monkeypatch.setenv("MISTUDIO_LABEL_API_KEY", SECRET)
    monkeypatch.delenv("MISTUDIO_LABEL_BASE_URL", raising=False)
    OpenAILabeler(server + "/v1", "m").complete(hi, max_tokens=1)  # no binding: the key goes nowhere
    assert ChatServer.seen[-1]["auth"] is None
    bound = "https://labels.internal.example/v1"
    monkeypatch.setenv("MISTUDIO_LABEL_BASE_URL", bound)
    OpenAILabeler(server + "/v1", "m").complete(hi, max_tokens=1)  # a user's endpoint: no key
    assert ChatServer.seen[-1]["auth"] is None
    assert environment_key(bound) == SECRET and environment_key("HTTPS://Labels.internal.example:443/v1/") == SECRET
    assert environment_key(bound + "/chat/completions") == SECRET
    for other in ("http://labels.internal.example/v1", "https://labels.internal.example:8443/v1",
                  "https://labels.internal.example/v2", "https://evil.example/v1",
                  "https://labels.internal.example.evil.example/v1", "https://x@evil.example/v1"):
        assert environment_key(other) == "", other
    # what the dashboard's submit sends with the job: the server key for its endpoint only
    assert secrets({"method": "openai", "base_url": bound}, None) == {"api_key": SECRET}
    assert secrets({"method": "openai", "base_url": server + "/v1"}, None) is None
    assert secrets({"method": "openai", "base_url": server + "/v1"}, "users-own") == {"api_key": "users-own"}


def test_labeling_endpoints_are_http_only():
    from actors.jobs.label import LabelSpec, check

    for bad in ("file:///etc/passwd", "ftp://host/v1", "gopher://x", "http://", "127.0.0.1:8000/v1"):
        with pytest.raises(UserError, match="is not an http\\(s\\) URL"):
            OpenAILabeler(bad, "m")
        with pytest.raises(UserError, match="is not an http\\(s\\) URL"):
            check(None, LabelSpec(sae_id="s", method="openai", base_url=bad, endpoint_model="m"))


@pytest.mark.parametrize("route, message", [
    ("/broken/v1", r"answered HTTP 500 \(boom, you sent Bearer \*\*\*\); the server failed"),
    ("/garbage/v1", r"returned something that is not a chat completion \('<html>not json</html>'\)"),
    ("/empty/v1", r"returned something that is not a chat completion"),
    ("/nocontent/v1", r"returned something that is not a chat completion"),
    ("/nowhere", r"answered HTTP 404 \(no such route\); check the URL \(the API root usually ends in /v1\)"),
])
def test_endpoint_errors_are_one_line_without_the_key(server, route, message):
    labeler = OpenAILabeler(server + route, "m", api_key=SECRET)
    with pytest.raises(UserError, match=message) as e:
        labeler.label(ctx())
    text = str(e.value)
    assert text.startswith(f"labeling endpoint {server}{route} ") and SECRET not in text and "\n" not in text


def test_endpoint_down_slow_and_bad_urls():
    port = _free_port()
    with pytest.raises(EndpointUnreachable, match=rf"^labeling endpoint http://127.0.0.1:{port}/v1 is unreachable "
                                                  r"\(.*refused.*\); check the URL and that the server runs$"):
        OpenAILabeler(f"http://127.0.0.1:{port}/v1", "m", api_key=SECRET, timeout=5).label(ctx())
    with pytest.raises(UserError, match="is not an http"):
        OpenAILabeler("127.0.0.1:8000", "m")
    silent = socket.socket()  # accepts connections, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1?key={SECRET}"
        with pytest.raises(EndpointUnreachable, match=r"^labeling endpoint http://127.0.0.1:\d+/v1 is unreachable "
                                                      r"\(timed out\)") as e:
            OpenAILabeler(url, "m", timeout=0.3).complete([{"role": "user", "content": "hi"}])
        assert SECRET not in str(e.value) and SECRET not in repr(OpenAILabeler(url, "m"))
        with pytest.raises(UserError) as e:  # credentials in the URL are never shown either
            OpenAILabeler(f"http://user:{SECRET}@127.0.0.1:{port}/v1", "m", timeout=2).complete([])
        assert SECRET not in str(e.value) and "labeling endpoint http://127.0.0.1" in str(e.value)
    finally:
        silent.close()


def test_endpoint_yes_margins_from_logprobs_or_the_answer(server):
    prompts = [[{"role": "user", "content": "Is Paris a city? Answer Yes or No."}]]
    fixed = OpenAILabeler(server + "/fixed/v1", "m")
    (m,) = fixed.yes_margins(prompts)
    assert m == pytest.approx(torch.tensor([-0.1, -5.0]).logsumexp(0).item() + 2.4, abs=1e-6)
    assert ChatServer.seen[-1]["body"]["max_tokens"] == 1 and ChatServer.seen[-1]["body"]["logprobs"] is True
    plain = OpenAILabeler(server + "/nologprobs/v1", "m")
    assert plain.yes_margins(prompts * 2) == [-1.0, -1.0]  # the tiny model answers neither Yes nor No: No
    assert plain._logprobs is False and "logprobs" not in ChatServer.seen[-1]["body"]  # asked once, then not


# ---------------------------------------------------------------------- bulk labeling


class Flaky:
    """Fails on latent 2 with a UserError and on latent 4 with a bug."""

    def label(self, c, template):
        if c.latent == 2:
            raise UserError("the labeling model returned no usable label")
        if c.latent == 4:
            raise RuntimeError("CUDA out of\nmemory")
        return Label(f"f{c.latent}", source="local:x")


def test_label_many_reports_progress_and_goes_past_failures():
    seen = []
    labels, errors = label_many(Flaky(), [ctx(i) for i in range(6)], progress=seen.append)
    assert sorted(labels) == [0, 1, 3, 5] and labels[3].name == "f3"
    assert errors == {2: "the labeling model returned no usable label", 4: "RuntimeError: CUDA out of memory"}
    assert [p["done"] for p in seen] == [0, 1, 2, 3, 4, 5, 6] and {p["total"] for p in seen} == {6}
    assert {p["phase"] for p in seen} == {"label"} and seen[-1]["failed"] == 2 and seen[-1]["eta_s"] == 0
    assert all(p["samples_per_s"] > 0 for p in seen[1:])
    heur = label_many(None, [ctx(7)])
    assert heur.labels[7].source == "heuristic" and heur.errors == {}


def test_label_many_cancels_between_features():
    calls = iter(range(100))
    seen = []
    with pytest.raises(Cancelled):
        label_many(Flaky(), [ctx(i) for i in range(5)], progress=seen.append, should_cancel=lambda: next(calls) >= 2)
    assert seen[-1]["done"] == 2  # two labeled, the third never started


def test_label_many_gives_up_on_a_dead_endpoint_but_records_a_few():
    dead = OpenAILabeler(f"http://127.0.0.1:{_free_port()}/v1", "m", timeout=5)
    labels, errors = label_many(dead, [ctx(i) for i in range(2)])
    assert labels == {} and set(errors) == {0, 1} and "is unreachable" in errors[0]
    with pytest.raises(EndpointUnreachable, match="is unreachable"):
        label_many(dead, [ctx(i) for i in range(10)])


# ---------------------------------------------------------------------- detection score


def test_detection_counts_and_batching(tiny):
    res = detection_score(tiny, Label("cities", description="city names"), CITY_TEXTS[:3], CODE_TEXTS[:2])
    assert res.n == 5 and res.true_positives + res.false_negatives == 3
    assert res.true_negatives + res.false_positives == 2
    said_yes = [m > 0 for m in res.margins]
    assert res.true_positives == sum(said_yes[:3]) and res.false_positives == sum(said_yes[3:])
    assert res.balanced_accuracy == pytest.approx(0.5 * (res.true_positives / 3 + res.true_negatives / 2))
    assert 0 <= res.auroc <= 1 and 0 <= res.balanced_accuracy <= 1
    assert res == detection_score(tiny, Label("cities", description="city names"), CITY_TEXTS[:3], CODE_TEXTS[:2])
    with pytest.raises(UserError, match="needs both"):
        detection_score(tiny, Label("x"), [], ["y"])


def test_detection_through_an_endpoint(server):
    res = detection_score(OpenAILabeler(server + "/fixed/v1", "m"), Label("cities"), CITY_TEXTS[:2], CODE_TEXTS[:2])
    assert (res.true_positives, res.false_positives, res.balanced_accuracy, res.auroc) == (2, 2, 0.5, 0.5)
    asked = ChatServer.seen[-1]["body"]["messages"][0]["content"]
    assert asked == 'Text: for i in range(10):\n\nDoes this text contain "cities"? Answer Yes or No.'


def test_label_features_from_a_discovery_folder(tmp_path, tiny):
    """What the labeling job runs: registry rows + examples.parquet → labels (+ detection scores)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from core.features.schema import EXAMPLES_FILE
    from core.interp import label_features
    from core.nlp import analyze

    windows = {0: [[" I", " moved", " to", " Paris"], [" We", " flew", " to", " London"]],
               1: [["x", " =", " f", "("], ["print", "("]]}
    rows = [{"latent": i, "kind": kind, "tokens": w, "max_index": len(w) - 1}
            for i, ws in windows.items() for w in ws for kind in ("top", "quantile")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / EXAMPLES_FILE)
    feats = [{"latent": i, "top_tokens": [ws[0][-1]], "frequency": 0.1,
              "analysis": {"nlp": analyze([r for r in rows if r["latent"] == i and r["kind"] == "top"]).to_dict(),
                           "logits": {"pos_str": [" France"], "neg_str": [" the"]}}} for i, ws in windows.items()]
    heur = label_features(None, feats, tmp_path)
    assert heur["errors"] == {} and heur["labels"][0]["category"] == "entity"
    assert label_features(None, feats, tmp_path, block=1) == heur, "reading one latent at a time changes nothing"
    assert heur["labels"][1]["name"] == "code punctuation (" and "detection" not in heur["labels"][1]
    seen = []
    out = label_features(tiny, feats, tmp_path, PromptTemplate("t", "", "{examples}\n{promoted}", '{"name": "'),
                         detection=True, progress=seen.append, block=1)
    assert set(out["labels"]) | set(out["errors"]) == {0, 1}
    for i, lab in out["labels"].items():
        assert lab["source"] == "local:tiny" and lab["detection"]["n"] == 3  # its 2 contexts + 1 of the other's
    assert [p["phase"] for p in seen].count("label") == 3 and seen[-1]["phase"] == "detect"


# ---------------------------------------------------------------------- the real SmolLM2


@pytest.mark.slow
def test_smollm2_labels_locally_and_over_http_and_scores_detection(smollm2_dir):
    """The embedded SmolLM2 labels a clear feature offline through its chat template, locally and
    served over HTTP; its detection score is computed both ways. SmolLM2-135M is a weak judge
    (near chance on cities vs code): the figures are printed, the counts are checked."""
    local = LocalLabeler.embedded(smollm2_dir, max_new_tokens=48)
    assert local.source == "local:SmolLM2-135M-Instruct"
    local.source = "local:smollm2"
    tok = local.tokenizer
    c = ctx(top=(" Paris", " London", " Rome"), examples=CITY_EXAMPLES,
            summary="Fires mostly on proper nouns (100%); 4 of 4 inside GPE entities (e.g. Paris, London).")
    lab = local.label(c)
    assert lab.source == "local:smollm2" and lab.category in CATEGORIES and 1 <= len(lab.name.split()) <= 5
    assert lab.raw.startswith('{"name": "')
    assert _json_closed(lab.raw) or len(tok(lab.raw)["input_ids"]) >= 48  # stopped at the JSON's end, or ran out

    srv, url = _serve(local)
    try:
        remote = OpenAILabeler(url + "/v1", "smollm2", api_key=SECRET)
        remote_lab = remote.label(c)  # no answer prefix over HTTP: the model answers as it likes
        assert remote_lab.source == "openai:smollm2" and remote_lab.raw == local.complete(DEFAULT_TEMPLATE.messages(c))
        city = Label("city names", "entity", "Names of cities.")
        by_logits = detection_score(local, city, CITY_TEXTS, CODE_TEXTS)
        by_http = detection_score(remote, city, CITY_TEXTS, CODE_TEXTS)
    finally:
        srv.shutdown()
        srv.server_close()
    for res in (by_logits, by_http):
        assert res.n == 8 and res.true_positives + res.false_negatives == 4 and len(res.margins) == 8
        assert res.true_negatives + res.false_positives == 4 and 0 <= res.auroc <= 1
    print(f"\nSmolLM2 label: {lab.name!r} ({lab.category}); over HTTP: {remote_lab.name!r} ({remote_lab.category})\n"
          f"detection 'city names', cities vs code: local logits balanced accuracy {by_logits.balanced_accuracy:.2f} "
          f"AUROC {by_logits.auroc:.2f}; HTTP logprobs {by_http.balanced_accuracy:.2f} AUROC {by_http.auroc:.2f}")
