"""The OpenAI-compatible client: any chat-completions endpoint (OpenAI, vLLM, llama.cpp's
server, Ollama, ...) over plain HTTP(S), with no SDK. It writes labels from the LLM explainer's
prompt and answers a scorer's Yes/No questions from logprobs or a one-token answer."""

from __future__ import annotations

import http.client
import json
import math
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from core.errors import UserError
from core.interp.explainers.llm import DEFAULT_TEMPLATE, PromptTemplate, parse_label
from core.interp.types import EndpointError, EndpointUnreachable, FeatureContext, Label

KEY_ENV = ("MISTUDIO_LABEL_API_KEY", "OPENAI_API_KEY")
"""Environment variables an endpoint's API key is read from, in this order."""
BASE_URL_ENV = "MISTUDIO_LABEL_BASE_URL"
"""The one endpoint the environment's key is sent to: a server's key must never reach an
address a user typed (they bring their own key for that)."""
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _endpoint(url: str) -> tuple[str, str, int | None, str]:
    """What makes two base URLs the same endpoint: scheme, host, port, API root path."""
    u = urllib.parse.urlsplit(url.strip())
    try:
        port = u.port or _DEFAULT_PORTS.get(u.scheme.lower())
    except ValueError:  # a malformed port names no endpoint
        port = -1
    path = u.path.rstrip("/").removesuffix("/chat/completions").rstrip("/")
    return u.scheme.lower(), (u.hostname or "").lower(), port, path


def environment_key(base_url: str) -> str:
    """The environment's API key (MISTUDIO_LABEL_API_KEY, else OPENAI_API_KEY) when `base_url`
    is the endpoint it is bound to (MISTUDIO_LABEL_BASE_URL), else "": no binding, no key."""
    bound = os.environ.get(BASE_URL_ENV, "").strip()
    if not bound or _endpoint(bound) != _endpoint(base_url):
        return ""
    return next((os.environ[k] for k in KEY_ENV if os.environ.get(k)), "")


def check_url(base_url: str) -> None:
    """A labeling endpoint must be an http(s) URL with a host (no file:, ftp:, ... schemes)."""
    u = urllib.parse.urlsplit(base_url.strip())
    if u.scheme.lower() not in ("http", "https") or not u.hostname:
        raise UserError(f"labeling endpoint {_public_url(base_url)!r} is not an http(s) URL; give one like "
                        "http://127.0.0.1:8000/v1")


def _public_url(url: str) -> str:
    """`url` without user:password@ or a query string, safe to show."""
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.hostname + (f":{u.port}" if u.port else "") if u.hostname else "",
                                    u.path, "", ""))


class OpenAILabeler:
    """Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp's server,
    Ollama, ...) over plain HTTP(S). `base_url` is the API root (usually ending in /v1) or the
    full .../chat/completions URL. The API key comes from `api_key`, or from the environment
    (MISTUDIO_LABEL_API_KEY, else OPENAI_API_KEY) only when `base_url` is MISTUDIO_LABEL_BASE_URL;
    it is sent only as a Bearer header and never logged, stored, shown in repr or put in an
    error message."""

    def __init__(self, base_url: str, model: str = "default", api_key: str | None = None, timeout: float = 60.0,
                 max_tokens: int = 200):
        check_url(base_url)
        base = base_url.strip().rstrip("/")
        u = urllib.parse.urlsplit(base)
        path = u.path.rstrip("/")  # the query (Azure's ?api-version=...) stays at the end
        path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        self.url = urllib.parse.urlunsplit((u.scheme, u.netloc, path, u.query, ""))
        self.base_url, self.model, self.timeout, self.max_tokens = base, model, timeout, max_tokens
        self._key = api_key if api_key is not None else environment_key(base)
        self._logprobs = True  # asked for in detection until the endpoint refuses them
        self.source = f"openai:{model}"
        self._where = f"labeling endpoint {_public_url(base)}"

    def __repr__(self) -> str:
        key = "set" if self._key else "none"
        return f"OpenAILabeler({_public_url(self.base_url)!r}, model={self.model!r}, key={key})"

    def _scrub(self, text: str) -> str:
        """One line, without the key (a server may echo what it was sent)."""
        text = " ".join(str(text).split())
        return text.replace(self._key, "***") if self._key else text

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                payload = resp.read()
        except urllib.error.HTTPError as e:
            raise EndpointError(self._http_error(e), e.code) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise EndpointUnreachable(f"{self._where} is unreachable ({self._scrub(reason)}); check the URL and "
                                      "that the server runs") from None
        try:
            out = json.loads(payload)
            out["choices"][0]["message"]["content"]  # may be null (an empty answer), must be there
            return out
        except (ValueError, KeyError, IndexError, TypeError):
            raise UserError(f"{self._where} returned something that is not a chat completion "
                            f"({self._scrub(payload[:80].decode('utf-8', 'replace'))!r}); check that the URL is the "
                            "API root of an OpenAI-compatible server (usually ending in /v1)") from None

    def _http_error(self, e: urllib.error.HTTPError) -> str:
        try:
            detail = e.read(2000).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            detail = ""
        try:  # OpenAI's shape: {"error": {"message": ...}}; else the body as text
            err = json.loads(detail).get("error", detail)
            detail = err.get("message", "") if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            pass
        fix = {401: "check the API key (the api_key argument, or MISTUDIO_LABEL_API_KEY / OPENAI_API_KEY, which "
                    f"are sent only to {BASE_URL_ENV})",
               403: "check the API key and that it may use this model",
               404: "check the URL (the API root usually ends in /v1) and the model name",
               429: "the endpoint is rate-limiting; label fewer features or try later"}.get(
            e.code, "check the URL and the model name" if e.code < 500 else "the server failed; check its log")
        detail = self._scrub(detail)[:120]
        return f"{self._where} answered HTTP {e.code}{f' ({detail})' if detail else ''}; {fix}"

    def complete(self, messages: list[dict[str, str]], max_tokens: int | None = None) -> str:
        out = self._post({"model": self.model, "messages": messages, "temperature": 0,
                          "max_tokens": max_tokens or self.max_tokens})
        return str(out["choices"][0]["message"].get("content") or "")

    def label(self, ctx: FeatureContext, template: PromptTemplate = DEFAULT_TEMPLATE) -> Label:
        return parse_label(self.complete(template.messages(ctx)), self.source)

    def _yes_margin(self, messages: list[dict[str, str]]) -> float:
        body = {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": 1}
        try:
            out = self._post({**body, "logprobs": True, "top_logprobs": 5} if self._logprobs else body)
        except EndpointError as e:
            if not (self._logprobs and e.status in (400, 422)):
                raise
            self._logprobs = False  # this server does not do logprobs: ask for the answer only
            out = self._post(body)
        choice = out["choices"][0]
        try:
            top = (choice.get("logprobs") or {}).get("content")[0].get("top_logprobs") or []
        except (AttributeError, IndexError, TypeError):
            top = []
        yes = [float(t["logprob"]) for t in top if _yes_no(t.get("token")) == "yes"]
        no = [float(t["logprob"]) for t in top if _yes_no(t.get("token")) == "no"]
        if yes or no:
            return _margin(yes, no)
        word = _yes_no(choice["message"].get("content"))
        return 1.0 if word == "yes" else -1.0  # neither Yes nor No counts as No

    def yes_margins(self, prompts: list[list[dict[str, str]]]) -> list[float]:
        """For each prompt, log P(Yes) − log P(No) from the endpoint's top logprobs when it gives
        them, else ±1 from its one-token answer: > 0 means Yes. One request per prompt."""
        return [self._yes_margin(m) for m in prompts]

    def says_yes(self, messages: list[dict[str, str]]) -> bool:
        return self._yes_margin(messages) > 0


def _yes_no(token: Any) -> str:
    word = str(token or "").strip().strip("*.\"'!").lower()
    return word if word in ("yes", "no") else ""


def _margin(yes: list[float], no: list[float], cap: float = 50.0) -> float:
    lse = lambda xs: math.log(sum(math.exp(x) for x in xs)) if xs else -math.inf
    return max(-cap, min(cap, lse(yes) - lse(no)))  # capped: one side absent from the top-k is "very sure"
