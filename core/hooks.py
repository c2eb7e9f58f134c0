"""Hook sites with TransformerLens names, and a forward pass that captures them.

One site, one name, everywhere (extraction, training, discovery, steering, export):

* `blocks.{L}.hook_resid_pre`  — the residual stream entering decoder block L
* `blocks.{L}.hook_resid_post` — the residual stream leaving block L (the block's output)
* `blocks.{L}.hook_attn_out`   — the attention term the block adds to its residual stream
* `blocks.{L}.hook_mlp_out`    — the MLP term the block adds to its residual stream

so that resid_pre + attn_out + mlp_out == resid_post for every family, sequential or parallel
residual. The term added is the sublayer's output followed through the block's modules that
consume it directly: Gemma 2/3's post_attention_layernorm / post_feedforward_layernorm (which
normalise the sublayer's output before the residual add), or a residual dropout. It is found by
data flow during the forward, not from a table of architectures: a child module of the block
whose input *is* the sublayer's output tensor (the same object) is on the path to the residual
add; the first child that reads something else (or the block's end) closes the path. Llama's
post_attention_layernorm, despite the name, reads the residual stream (resid_pre + attn_out),
so it is not followed.

`run_hooked` stops the forward pass as soon as every requested site has been captured, so
layers past the deepest hooked one never run: that is the main lever on extraction speed.

`patched` is the other direction: within a `with` block every forward (a full pass or each
step of `generate` with the KV cache) replaces the activation at named sites with an edit of
it — splicing an SAE reconstruction in, ablating a sublayer, steering.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from typing import Callable, Iterator

import torch

from core.errors import UserError
from core.models import find_layers

SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out")
_NAME = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")
_FORM = "blocks.{L}.hook_{site} with site one of " + ", ".join(SITES)

# Child-module names of a decoder block's sublayers across Hugging Face architectures.
_SUBLAYER_NAMES = {
    "mlp_out": ("mlp", "feed_forward", "ffn"),
    "attn_out": ("self_attn", "attn", "attention", "self_attention"),
}


def hook_name(layer: int, site: str = "resid_post") -> str:
    """TransformerLens name of a hook site, e.g. hook_name(6) == "blocks.6.hook_resid_post"."""
    if site not in SITES:
        raise UserError(f"unknown hook site '{site}'; use one of: {', '.join(SITES)}")
    return f"blocks.{int(layer)}.hook_{site}"


def parse_hook_name(name: str) -> tuple[int, str]:
    """(layer, site) of a hook name like "blocks.6.hook_resid_post"."""
    m = _NAME.match(name.strip())
    if m is None or m.group(2) not in SITES:
        raise UserError(f"malformed hook name '{name}'; expected {_FORM}, e.g. blocks.6.hook_resid_post")
    return int(m.group(1)), m.group(2)


def _sublayer(block: torch.nn.Module, site: str) -> torch.nn.Module:
    """The attention or MLP submodule of a decoder block, found by its conventional name."""
    for attr in _SUBLAYER_NAMES[site]:
        module = getattr(block, attr, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise UserError(f"cannot find the {site.removesuffix('_out')} sublayer in {type(block).__name__} "
                    f"(looked for {', '.join(_SUBLAYER_NAMES[site])}); use hook_resid_post or hook_resid_pre")


def validate_hooks(model, names: list[str]) -> None:
    """Raise UserError unless every name parses and points at an existing layer and sublayer."""
    if not names:
        raise UserError("no hook names given; pass at least one, e.g. blocks.6.hook_resid_post")
    layers = find_layers(model)
    n = len(layers)
    for name in names:
        layer, site = parse_hook_name(name)
        if layer >= n:
            raise UserError(f"layer {layer} is out of range: the model has {n} layers (0-{n - 1}); "
                            "pick --layers within it")
        if site in _SUBLAYER_NAMES:
            _sublayer(layers[layer], site)


class _StopForward(Exception):
    """Raised from a hook once every requested site is captured, to skip the remaining layers."""


def _first_tensor(output) -> torch.Tensor:
    # Decoder blocks and attention modules return a tensor or a tuple whose first item is it.
    return output[0] if isinstance(output, (tuple, list)) else output


def _first_input(args, kwargs):
    # The main input of a module call: its first positional argument, else hidden_states=...
    if args:
        return args[0]
    return kwargs.get("hidden_states", next(iter(kwargs.values()), None))


def run_hooked(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               hook_names: list[str]) -> dict[str, torch.Tensor]:
    """Forward `input_ids` and return {hook name: float32 activations [B, T, d_model]}.

    The forward stops right after the last requested site is captured. Tensors stay on the
    model's device and are copies, detached from the graph. Inside `patched(...)` the
    captured activations are the edited ones.
    """
    return _capture(model, input_ids, attention_mask, hook_names)[0]


def _capture(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, hook_names: list[str]
             ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.nn.Module, ...]]]:
    """run_hooked's activations, and for each attn_out / mlp_out site the path its term took:
    (sublayer, child, ...), each module reading the previous one's output; the last one's
    output is what the block adds to its residual stream.

    One piece: the hooks it registers and the forward they run under share one try/finally, so
    no hook outlives the call."""
    validate_hooks(model, hook_names)
    layers = find_layers(model)
    wanted = list(dict.fromkeys(hook_names))  # dedupe, keep order
    captured: dict[str, torch.Tensor] = {}
    paths: dict[str, tuple[torch.nn.Module, ...]] = {}

    def store(name: str, tensor: torch.Tensor, copy: bool = True) -> None:
        # A copy: the model may reuse or modify its buffers after the hook returns.
        captured[name] = tensor.detach().to(torch.float32, copy=True) if copy else tensor
        if len(captured) == len(wanted):
            raise _StopForward

    def post_hook(name):
        return lambda module, args, output: store(name, _first_tensor(output))

    def sublayer_hooks(name: str, block: torch.nn.Module, sublayer: torch.nn.Module) -> list:
        # Follow the sublayer's output through the block's children that take it as input
        # (post-sublayer norm, dropout) and store what reaches the residual add. Copies are taken
        # at every step, in case the block later updates a tensor in place.
        # ref: the live tensor, for identity tests; path: the modules it went through.
        state = {"ref": None, "value": None, "via": None, "path": ()}

        def finish():
            if state["ref"] is not None and name not in captured:
                value, state["ref"] = state["value"], None
                paths[name] = state["path"]
                store(name, value, copy=False)  # already a float32 copy; may stop the forward

        def sublayer_out(module, args, output):
            if name not in captured:
                out = _first_tensor(output)
                state.update(ref=out, value=out.detach().to(torch.float32, copy=True), path=(module,))

        def child_pre(module, args, kwargs):
            if state["ref"] is None or name in captured:
                return
            if _first_input(args, kwargs) is state["ref"]:
                state["via"] = module
            else:
                finish()

        def child_post(module, args, output):
            if state["via"] is module and state["ref"] is not None:
                state["via"] = None
                out = _first_tensor(output)
                if isinstance(out, torch.Tensor) and out.shape == state["ref"].shape:
                    state.update(ref=out, value=out.detach().to(torch.float32, copy=True),
                                 path=state["path"] + (module,))

        hs = [sublayer.register_forward_hook(sublayer_out)]
        for child in block.children():
            if child is not sublayer:
                hs.append(child.register_forward_pre_hook(child_pre, with_kwargs=True))
                hs.append(child.register_forward_hook(child_post))
        hs.append(block.register_forward_hook(lambda module, args, output: finish()))
        return hs

    def pre_hook(name):
        def hook(module, args, kwargs):
            # Some models pass hidden_states as a keyword argument.
            store(name, args[0] if args else kwargs["hidden_states"])
        return hook

    handles = []
    try:
        for name in wanted:
            layer, site = parse_hook_name(name)
            block = layers[layer]
            if site == "resid_pre":
                handles.append(block.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
            elif site == "resid_post":
                handles.append(block.register_forward_hook(post_hook(name)))
            else:
                handles.extend(sublayer_hooks(name, block, _sublayer(block, site)))
        device = next(model.parameters()).device
        with torch.no_grad():
            try:
                model(input_ids=input_ids.to(device),
                      attention_mask=None if attention_mask is None else attention_mask.to(device),
                      use_cache=False)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in wanted if n not in captured]
    if missing:
        raise RuntimeError(f"hooks never fired for {missing}; the model did not run those modules")
    return {name: captured[name] for name in hook_names}, paths


# --------------------------------------------------------------------------- patching

Edit = Callable[[torch.Tensor], torch.Tensor]

# Per decoder block: {site: the path its attn/mlp term takes to the residual add}. Weak keys,
# so a cached path never keeps a model alive.
_PATHS: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, tuple[torch.nn.Module, ...]]]" = \
    weakref.WeakKeyDictionary()
# While tracing a path, the hooks of any enclosing `patched` block stand aside (per thread).
_TRACE = threading.local()


def _tracing() -> bool:
    return getattr(_TRACE, "active", False)


def _residual_path(model, layer: int, site: str) -> tuple[torch.nn.Module, ...]:
    """The modules an attn_out / mlp_out term passes through, sublayer first; the last one's
    output is the term added to the residual stream. Found once per block by a 2-token forward
    that stops inside the block, with run_hooked's data-flow rule, then cached."""
    block = find_layers(model)[layer]
    cached = _PATHS.setdefault(block, {})
    if site not in cached:
        name = hook_name(layer, site)
        device = next(model.parameters()).device
        _TRACE.active = True
        try:
            cached[site] = _capture(model, torch.zeros((1, 2), dtype=torch.long, device=device), None, [name])[1][name]
        finally:
            _TRACE.active = False
    return cached[site]


def _apply(name: str, fn: Edit, x: torch.Tensor) -> torch.Tensor:
    y = fn(x)
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"the edit at {name} returned {got}; it must return a tensor of shape {list(x.shape)}")
    return y.to(device=x.device, dtype=x.dtype)


def _replace_first(output, value: torch.Tensor):
    if isinstance(output, tuple):
        return (value, *output[1:])
    if isinstance(output, list):
        return [value, *output[1:]]
    return value


def _edit_resid_pre(name: str, fn: Edit):
    def hook(module, args, kwargs):
        if _tracing():
            return None
        if args:
            return (_apply(name, fn, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": _apply(name, fn, kwargs["hidden_states"])}
    return hook


def _edit_output(name: str, fn: Edit):
    def hook(module, args, output):
        if _tracing():
            return None
        return _replace_first(output, _apply(name, fn, _first_tensor(output)))
    return hook


def _edit_term(name: str, fn: Edit, path: tuple[torch.nn.Module, ...]) -> list:
    """Hooks that follow the sublayer's output along `path` by identity and edit the output of
    the path's last module. Following by identity matters when a module on the path is shared:
    Phi-1/2 sends both sublayers' outputs through one `resid_dropout`."""
    if len(path) == 1:
        return [path[0].register_forward_hook(_edit_output(name, fn))]
    state = {"ref": None, "at": -1}  # the live tensor, and the index on `path` that produced it

    def sublayer_out(module, args, output):
        if not _tracing():
            state.update(ref=_first_tensor(output), at=0)

    def step(i: int):
        def hook(module, args, kwargs, output):
            if _tracing() or state["at"] != i - 1 or _first_input(args, kwargs) is not state["ref"]:
                return None
            if i < len(path) - 1:
                state.update(ref=_first_tensor(output), at=i)
                return None
            state.update(ref=None, at=-1)
            return _replace_first(output, _apply(name, fn, _first_tensor(output)))
        return hook

    handles = [path[0].register_forward_hook(sublayer_out)]
    handles += [m.register_forward_hook(step(i), with_kwargs=True) for i, m in enumerate(path) if i > 0]
    return handles


@contextlib.contextmanager
def patched(model, edits: dict[str, Edit]) -> Iterator[None]:
    """Within the block, every forward of `model` replaces the activation at each named hook
    site with edits[name](activation).

    The edit receives the site's tensor [B, T, d_model] exactly as `run_hooked` would capture it,
    but live, in the model's dtype (do not modify it in place), and returns a tensor of the same
    shape; the result is cast back to the model's dtype and device. It runs on every forward:
    full passes, stopped `run_hooked` passes (which then capture the edited activations), and
    each step of `model.generate(..., use_cache=True)`, where later steps see T = 1 — so
    steering reaches the generated positions too.

    resid_pre edits the block's input, resid_post its output; attn_out / mlp_out edit the term
    the block adds to its residual stream (after Gemma 2's post-sublayer norms or a residual
    dropout), so an edit there is seen by everything downstream, the residual add included.
    Finding that term runs one 2-token forward per (block, site) the first time, stopped inside
    the block. Hooks are removed on exit, also when the block raises.
    """
    if edits:
        validate_hooks(model, list(edits))
    layers = find_layers(model)
    handles = []
    try:
        for name, fn in edits.items():
            layer, site = parse_hook_name(name)
            block = layers[layer]
            if site == "resid_pre":
                handles.append(block.register_forward_pre_hook(_edit_resid_pre(name, fn), with_kwargs=True))
            elif site == "resid_post":
                handles.append(block.register_forward_hook(_edit_output(name, fn)))
            else:
                handles += _edit_term(name, fn, _residual_path(model, layer, site))
        yield
    finally:
        for handle in handles:
            handle.remove()
