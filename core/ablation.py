"""The measured ablation effect of SAE latents: on contexts where a latent fires, the change in
next-token loss when only that latent's contribution z_i(x)·W_dec[i] is removed from the
activation at every position (the SAE's error term and every other latent stay).

Several latents share each forward: every context row carries its own latent, the hook removes
row r's latent from row r alone, and the rows of a group of latents are packed by length into
forwards of at most `max_tokens` padded positions. Padding never enters an average, and a causal model
reads a right-padded row exactly as it reads the row alone, so a latent's figures do not depend
on which others shared its forwards (tests/test_analysis.py pins this against a plain loop).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

from core import hooks
from core.data.batches import right_padded
from core.errors import UserError
from core.progress import check_cancel


class AblationEffect(NamedTuple):
    latent: int
    n_contexts: int
    """Contexts measured (those with a next token after the max position)."""
    activation: list[float]
    """The latent's activation at each context's max position."""
    delta_loss_at_max: list[float]
    """Per context: CE(ablated) − CE(clean) for the token after the max position (nats)."""
    delta_loss_after: list[float]
    """Per context: mean CE change over the next tokens from the max position on (nats)."""
    mean_delta_loss_at_max: float
    mean_delta_loss_after: float
    dropped_ids: list[int]
    """Tokens whose log-probability after the max position fell most when ablated (mean over contexts)."""
    dropped_values: list[float]
    raised_ids: list[int]
    raised_values: list[float]


class Ablation(NamedTuple):
    """What to measure for one latent: its contexts (1-D token-id rows as the model read them)
    and, per context, the position where it fired."""

    latent: int
    contexts: Sequence[torch.Tensor]
    positions: Sequence[int]


ENCODE_TOKENS = 1024
"""Tokens encoded at once inside the hook: bounds the dense [tokens, d_sae] activations (1024 ×
65,536 fp32 = 256 MB)."""


def check_model(model, sae, hook_name: str) -> None:
    hooks.validate_hooks(model, [hook_name])
    d_model = int(model.get_input_embeddings().embedding_dim)
    if int(sae.W_dec.shape[1]) != d_model:
        raise UserError(f"SAE d_in={int(sae.W_dec.shape[1])} does not match {hook_name} of this model "
                        f"(d_model={d_model}); pick the model the SAE was trained on")


def _rows(item: Ablation, d_sae: int) -> list[tuple[torch.Tensor, int]]:
    """The (context, position) rows of one latent that have a next token; one line if none."""
    if not 0 <= item.latent < d_sae:
        raise UserError(f"latent {item.latent} is out of range: this SAE has latents 0-{d_sae - 1}")
    if len(item.contexts) != len(item.positions):
        raise UserError(f"{len(item.contexts)} contexts but {len(item.positions)} positions; give one position per "
                        "context")
    for c, p in zip(item.contexts, item.positions):
        if not 0 <= p < len(c):
            raise UserError(f"position {p} is outside a context of {len(c)} tokens")
    rows = [(torch.as_tensor(c, dtype=torch.long), int(p)) for c, p in zip(item.contexts, item.positions)
            if p < len(c) - 1]
    if not rows:
        raise UserError("no context has a token after the latent's position; give longer contexts")
    return rows


@torch.no_grad()
def ablation_effects(model, sae, hook_name: str, items: Sequence[Ablation], n_tokens: int = 5, pad_id: int = 0,
                     max_tokens: int = 2048, group: int = 16, progress: Callable[[int], None] | None = None,
                     should_cancel: Callable[[], bool] | None = None) -> list[AblationEffect | UserError]:
    """The ablation effect of each item's latent, in item order; an item that cannot be measured
    (no context with a token after its position, ...) gets the one-line UserError instead.
    Items are measured `group` at a time, their rows sorted by length and packed into forwards of
    at most `max_tokens` padded positions (its logits are [rows, T, vocab]); so a group's items
    finish together, the rows held between forwards are one group's, and `progress(done)` (items
    finished) moves every group."""
    check_model(model, sae, hook_name)
    d_sae = int(sae.W_dec.shape[0])
    out: list[AblationEffect | UserError | None] = [None] * len(items)
    for g in range(0, len(items), max(1, group)):
        flat: list[tuple[int, torch.Tensor, int, int]] = []  # (item index, context, position, row of the item)
        for j in range(g, min(g + max(1, group), len(items))):
            try:
                flat += [(j, c, p, r) for r, (c, p) in enumerate(_rows(items[j], d_sae))]
            except UserError as e:
                out[j] = e
        flat.sort(key=lambda r: len(r[1]))  # similar lengths share a forward: little padding
        measured: dict[int, list[tuple[int, dict]]] = {}
        for batch in _pack(flat, max_tokens):
            check_cancel(should_cancel, "ablation")
            rows = _measure(model, sae, hook_name, batch, [items[b[0]].latent for b in batch], pad_id)
            for (j, _, _, r), row in zip(batch, rows):
                measured.setdefault(j, []).append((r, row))
        for j, got in measured.items():  # each item's rows in its contexts' order
            out[j] = _summarise(items[j].latent, [row for _, row in sorted(got, key=lambda t: t[0])], n_tokens)
        if progress is not None:
            progress(sum(o is not None for o in out))
    return out  # type: ignore[return-value]


def _pack(flat: list, max_tokens: int):
    """Consecutive rows (sorted by length) in forwards of at most max_tokens padded positions."""
    batch: list = []
    for r in flat:
        if batch and (len(batch) + 1) * len(r[1]) > max_tokens:
            yield batch
            batch = []
        batch.append(r)
    if batch:
        yield batch


def _measure(model, sae, hook_name: str, batch: list, latents: list[int], pad_id: int) -> list[dict]:
    """One clean and one ablated forward over the batch's rows, row r ablating latents[r]:
    per row its activation, loss deltas and the log-prob change after its max position."""
    contexts = [b[1] for b in batch]
    positions = torch.tensor([b[2] for b in batch])
    device = next(model.parameters()).device
    ids, mask = right_padded(contexts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    lat = torch.tensor(latents, device=device)
    directions = sae.W_dec.detach()[lat].float()  # [rows, d_in]
    seen: dict[str, torch.Tensor] = {}

    def ablate(x: torch.Tensor) -> torch.Tensor:
        z = _latent_activation(sae, x.float(), lat)  # [rows, T]
        seen["z"] = z
        return x.float() - z[..., None] * directions[:, None, :].to(x.device)

    rows = torch.arange(len(batch), device=device)
    at = positions.to(device)
    targets = ids[:, 1:]

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        nll = -logp[:, :-1].gather(2, targets[..., None])[..., 0]  # [B, T-1]: predicting token t+1
        return nll, logp[rows, at]  # keep only what is measured, not [B, T, vocab] twice

    nll_clean, lp_clean = forward()
    with hooks.patched(model, {hook_name: ablate}):
        nll_abl, lp_abl = forward()
    delta = (nll_abl - nll_clean).cpu()
    valid = mask[:, 1:].bool().cpu()  # a real next token
    t = torch.arange(delta.shape[1])
    after = valid & (t[None, :] >= positions[:, None])
    mean_after = (delta * after).sum(1) / after.sum(1)
    act = seen["z"][rows, at].cpu()
    dlogp = (lp_abl - lp_clean).cpu()
    return [{"activation": float(act[r]), "at_max": float(delta[r, positions[r]]), "after": float(mean_after[r]),
             "dlogp": dlogp[r]} for r in range(len(batch))]


def _latent_activation(sae, x: torch.Tensor, lat: torch.Tensor) -> torch.Tensor:
    """z_{lat[r]}(x[r, t]) for every row r and position t, encoding at most ENCODE_TOKENS
    tokens at once (the dense code of a wide SAE is [tokens, d_sae])."""
    B, T, d = x.shape
    flat = x.reshape(B * T, d)
    which = lat.repeat_interleave(T)
    out = torch.empty(B * T, device=x.device)
    for s in range(0, B * T, ENCODE_TOKENS):
        z = sae.encode(flat[s:s + ENCODE_TOKENS])
        out[s:s + ENCODE_TOKENS] = z.gather(1, which[s:s + ENCODE_TOKENS, None])[:, 0]
    return out.view(B, T)


def _summarise(latent: int, rows: list[dict], n_tokens: int) -> AblationEffect:
    at_max = torch.tensor([r["at_max"] for r in rows])
    after = torch.tensor([r["after"] for r in rows])
    dlogp = torch.stack([r["dlogp"] for r in rows]).mean(0)  # [vocab]
    dv, di = dlogp.topk(n_tokens, largest=False)
    rv, ri = dlogp.topk(n_tokens)
    return AblationEffect(
        latent=latent, n_contexts=len(rows), activation=[r["activation"] for r in rows],
        delta_loss_at_max=at_max.tolist(), delta_loss_after=after.tolist(),
        mean_delta_loss_at_max=float(at_max.mean()), mean_delta_loss_after=float(after.mean()),
        dropped_ids=di.tolist(), dropped_values=dv.tolist(), raised_ids=ri.tolist(), raised_values=rv.tolist())


def ablation_effect(model, sae, hook_name: str, contexts: Sequence[torch.Tensor], positions: Sequence[int],
                    latent: int, n_tokens: int = 5, pad_id: int = 0) -> AblationEffect:
    """One latent's ablation effect (`ablation_effects` of one item); a bad input raises."""
    (res,) = ablation_effects(model, sae, hook_name, [Ablation(int(latent), contexts, positions)], n_tokens, pad_id)
    if isinstance(res, UserError):
        raise res
    return res
