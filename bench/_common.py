"""Shared pieces of the benchmarks: the real SmolLM2 fixtures, machine facts, timing, RESULTS.md.

Fixtures are reused when another session already built them under /tmp/smol (model folder,
tokenized builtin corpus, cached blocks.15.hook_resid_post activations) and built otherwise
under $MISTUDIO_BENCH_CACHE (default /tmp/mistudio-bench). They are never modified.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS.md"
SHARED = Path("/tmp/smol")
CACHE = Path(os.environ.get("MISTUDIO_BENCH_CACHE", "/tmp/mistudio-bench"))
HOOK = "blocks.15.hook_resid_post"
ACT_TOKENS = 60_000
"""Tokens of cached activations built when none exist (the shared cache holds ~60k)."""


# --------------------------------------------------------------------------- fixtures


def model_dir() -> Path:
    """A converted SmolLM2-135M safetensors folder (converted once from the embedded GGUF)."""
    for d in (SHARED / "model", CACHE / "model"):
        if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
            return d
    from core.models import convert_gguf, embedded_gguf_path

    out = CACHE / "model"
    print(f"[bench] converting the embedded GGUF to {out} (once, ~30 s)", flush=True)
    return convert_gguf(embedded_gguf_path(), out)


def load(threads: int):
    """(model, tokenizer) in fp32 eval mode on CPU, torch pinned to `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    from core.models import load_model

    return load_model(model_dir())


def _built(d: Path, flag: str) -> bool:
    """`d` holds shards and its stats.json says `flag` (fixtures from before BOS-first contexts
    and special-token exclusion do not, and are rebuilt)."""
    import json

    stats = d / "stats.json"
    return stats.is_file() and any(d.glob("shard-*.parquet")) and bool(json.loads(stats.read_text()).get(flag))


def dataset_dir(tokenizer) -> Path:
    """The builtin corpus tokenized in rows of BOS + ≤ 255 tokens, as the studio builds them."""
    for d in (SHARED / "ds", CACHE / "ds"):
        if _built(d, "prepend_bos"):
            return d
    from core.data import tokenize_dataset

    out = CACHE / "ds"
    print(f"[bench] tokenizing the builtin corpus into {out}", flush=True)
    tokenize_dataset(tokenizer, "builtin", out, context_length=256)
    return out


def acts_dir(threads: int = 2) -> Path:
    """Cached activations of blocks.15.hook_resid_post over the builtin corpus (~60k tokens),
    special tokens (BOS, EOS, pad) left out by id as the studio's extraction does."""
    for d in (SHARED / "acts" / HOOK, CACHE / "acts" / HOOK):
        if _built(d, "excluded_special"):
            return d
    from core.data import special_token_ids
    from core.extract import extract_activations

    model, tok = load(threads)
    out = CACHE / "acts"
    print(f"[bench] extracting {ACT_TOKENS} tokens of {HOOK} into {out} (~1-2 min)", flush=True)
    extract_activations(model, tok, dataset_dir(tok), [HOOK], out, max_tokens=ACT_TOKENS,
                        exclude_token_ids=special_token_ids(tok))
    return out / HOOK


# --------------------------------------------------------------------------- machine + results


def machine() -> dict:
    """CPU model, core count, RAM, kernel, Python and torch versions."""
    info = {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        info["cpu"] = fields.get("Model name", info["cpu"]).strip()
        info["threads_per_core"] = fields.get("Thread(s) per core", "?").strip()
        flags = fields.get("Flags", "")
        info["simd"] = ",".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in f" {flags}")
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
        info["nproc"] = int(nproc)
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        info["ram_gib"] = round(kb / 2**20, 1)
    except (OSError, StopIteration):
        pass
    import torch

    info["python"] = platform.python_version()
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    return info


def load_avg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def command_line() -> str:
    """The command as a user would type it from the repo root."""
    exe = os.path.relpath(sys.executable, REPO) if sys.executable.startswith(str(REPO)) else sys.executable
    mod = Path(sys.argv[0]).resolve()
    try:
        mod_name = ".".join(mod.relative_to(REPO).with_suffix("").parts)
    except ValueError:
        mod_name = str(mod)
    return " ".join([exe, "-m", mod_name, *map(shlex.quote, sys.argv[1:])])


def append_result(title: str, body: str, *, command: str | None = None, load_before: str = "",
                  load_after: str = "", info: dict | None = None) -> None:
    """Append one dated entry to bench/RESULTS.md (created with a header if missing)."""
    info = info or machine()
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    m = (f"{info.get('cpu')} ({info.get('simd', '')}), nproc {info.get('nproc')}, "
         f"{info.get('ram_gib', '?')} GiB RAM, Python {info.get('python')}, torch {info.get('torch')} "
         f"({info.get('torch_threads')} threads)")
    entry = [f"\n## {now} — {title}\n",
             f"- machine: {m}",
             f"- load average (1/5/15 min): before {load_before or '?'}, after {load_after or load_avg()}",
             f"- command: `{command or command_line()}`\n",
             body.rstrip() + "\n"]
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nNewest entries last. Each entry is appended by the script "
                           "that produced it (see bench/README.md).\n")
    with RESULTS.open("a") as f:
        f.write("\n".join(entry))
    print(f"[bench] appended to {RESULTS}")


# --------------------------------------------------------------------------- numbers


def median(xs) -> float:
    return float(statistics.median(xs))


def spread(xs) -> str:
    """'median (min–max)' of a list of numbers, rounded for a table."""
    xs = list(xs)
    return f"{median(xs):,.0f} ({min(xs):,.0f}–{max(xs):,.0f})"


def ok(met: bool) -> str:
    return "**met**" if met else "**not met**"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
