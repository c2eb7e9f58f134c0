"""The local client: a Hugging Face causal LM in this process (the embedded SmolLM2 by default,
offline). It writes labels from the LLM explainer's prompt (greedy, stopped at the end of the
answer's JSON object) and answers a scorer's Yes/No questions from its next-token logits."""

from __future__ import annotations

import inspect
import os
from dataclasses import replace
from pathlib import Path

import torch

from core.errors import UserError
from core.interp.explainers.llm import DEFAULT_TEMPLATE, PromptTemplate, parse_label
from core.interp.types import FeatureContext, Label


def _json_closed(text: str) -> bool:
    """Whether the first JSON object in `text` is complete (braces balanced outside strings)."""
    start = text.find("{")
    if start < 0:
        return False
    depth, in_str, escaped = 0, False, False
    for ch in text[start:]:
        if in_str:
            escaped, in_str = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "{}":
            depth += 1 if ch == "{" else -1
            if depth == 0:
                return True
    return False


_YES, _NO = ("Yes", " Yes", "yes", " yes", "YES"), ("No", " No", "no", " no", "NO")


class LocalLabeler:
    """A Hugging Face causal LM in this process: greedy decoding through the tokenizer's chat
    template when it has one (a base model gets the messages as plain paragraphs)."""

    def __init__(self, model, tokenizer, name: str = "", max_new_tokens: int = 64):
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, max_new_tokens
        cfg = model.config
        self.source = f"local:{name or Path(getattr(cfg, '_name_or_path', '') or '').name or cfg.model_type}"

    @classmethod
    def embedded(cls, folder: str | os.PathLike | None = None, max_new_tokens: int = 64) -> "LocalLabeler":
        """The embedded SmolLM2-135M-Instruct, from a converted model `folder` (fast, see
        core.models.convert_gguf) or else the GGUF in its pip package (~20 s)."""
        from core.models import embedded_gguf_path, load_model

        model, tok = load_model(folder or embedded_gguf_path())
        return cls(model, tok, "SmolLM2-135M-Instruct", max_new_tokens)

    def __repr__(self) -> str:
        return f"LocalLabeler({self.source!r}, max_new_tokens={self.max_new_tokens})"

    @property
    def _templated(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, messages: list[dict[str, str]], prefix: str = "") -> str:
        """The text the model continues: the chat template with its assistant header, then `prefix`."""
        if self._templated:
            chat = lambda msgs: self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            try:
                return chat(messages) + prefix
            except Exception:  # noqa: BLE001 — jinja's TemplateError: some templates (Gemma) refuse a system role
                if not messages or messages[0]["role"] != "system" or len(messages) < 2:
                    raise
                merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
                return chat([merged, *messages[2:]]) + prefix
        text = "\n\n".join(m["content"] for m in messages if m["content"]) + "\n\nAnswer:"
        return text + (" " + prefix if prefix else "")

    def _encode(self, text: str) -> list[int]:
        # a chat template writes its own BOS; a plain prompt gets the tokenizer's
        return self.tokenizer(text, add_special_tokens=not self._templated)["input_ids"]

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def complete(self, messages: list[dict[str, str]], prefix: str = "") -> str:
        """The model's greedy answer (beginning with `prefix`); it stops at the end of a JSON object."""
        from transformers import GenerationConfig, StoppingCriteriaList

        ids = torch.tensor([self._encode(self.prompt(messages, prefix))], device=self._device)
        tok = self.tokenizer
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False,
                               eos_token_id=self.model.generation_config.eos_token_id or tok.eos_token_id,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        stop = _stop_at_json_end(tok, prefix, ids.shape[1])
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen,
                                  stopping_criteria=StoppingCriteriaList([stop]))
        return prefix + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    def _answer_ids(self) -> tuple[list[int], list[int]]:
        """First token ids of the Yes and No spellings; ids both share (a lone space) are dropped."""
        first = lambda words: {ids[0] for w in words if (ids := self.tokenizer.encode(w, add_special_tokens=False))}
        yes, no = first(_YES), first(_NO)
        yes, no = sorted(yes - no), sorted(no - yes)
        if not yes or not no:
            raise UserError("this tokenizer cannot tell Yes from No by their first token; "
                            "use another model for detection scores")
        return yes, no

    @torch.no_grad()
    def yes_margins(self, prompts: list[list[dict[str, str]]], batch_size: int = 8) -> list[float]:
        """For each prompt, log P(Yes) − log P(No) of the next token after the assistant header
        (each summed over spellings): > 0 means Yes. One forward per prompt, left-padded batches."""
        yes, no = self._answer_ids()
        seqs = [self._encode(self.prompt(m)) for m in prompts]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(self.model.forward).parameters else {}
        out: list[float] = []
        for s in range(0, len(seqs), batch_size):
            chunk = seqs[s:s + batch_size]
            width = max(map(len, chunk))
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, q in enumerate(chunk):
                ids[r, width - len(q):], mask[r, width - len(q):] = torch.tensor(q), 1
            # positions count real tokens only, so a left-padded prompt scores as it would alone
            pos = (mask.cumsum(1) - 1).clamp_min(0)
            logits = self.model(input_ids=ids.to(self._device), attention_mask=mask.to(self._device),
                                position_ids=pos.to(self._device), **keep).logits[:, -1].float()
            lp = logits.log_softmax(-1)
            out += (lp[:, yes].logsumexp(-1) - lp[:, no].logsumexp(-1)).tolist()
        return out

    def says_yes(self, messages: list[dict[str, str]]) -> bool:
        return self.yes_margins([messages])[0] > 0

    def _fit(self, ctx: FeatureContext, template: PromptTemplate) -> FeatureContext:
        """Drop examples from the end until the prompt and the answer fit the model's context:
        past it a model writes garbage (rotary positions) or fails (learned positions)."""
        cfg = self.model.config
        limit = next((v for k in ("max_position_embeddings", "n_positions", "max_seq_len")
                      if isinstance(v := getattr(cfg, k, None), int)), None)
        while limit and len(ctx.examples) > 1 and len(self._encode(
                self.prompt(template.messages(ctx), template.answer_prefix))) + self.max_new_tokens > limit:
            ctx = replace(ctx, examples=ctx.examples[:-1])
        return ctx

    def label(self, ctx: FeatureContext, template: PromptTemplate = DEFAULT_TEMPLATE) -> Label:
        ctx = self._fit(ctx, template)
        return parse_label(self.complete(template.messages(ctx), template.answer_prefix), self.source)


def _stop_at_json_end(tokenizer, prefix: str, start: int):
    """A stopping criterion: the answer's JSON object is closed (what a small model writes after
    it is chatter). Built here so that importing this module does not import transformers."""
    from transformers import StoppingCriteria

    class StopAtJsonEnd(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            text = prefix + tokenizer.decode(input_ids[0, start:], skip_special_tokens=True)
            return torch.full((input_ids.shape[0],), _json_closed(text), dtype=torch.bool, device=input_ids.device)

    return StopAtJsonEnd()
