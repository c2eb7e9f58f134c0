"""The dashboard at research width: headless Chromium (Playwright, as tests/test_browser.py drives
it) against two data roots served side by side — one holding a 4,608-latent SAE, one a
65,536-latent SAE, each with discovered features — timing what a user waits for:

* features page: a fresh browser session opens /features until the page is whole (the SAE
  summary, the first page of latents and the first latent's feature page with its contexts);
* search: text typed in "Search tokens and labels" + Enter until the matching page is shown;
* feature page: another latent picked in the "Latent" box until its page is shown;
* SAEs page: a fresh session opens /saes until the page is whole (listing, export panel).

Each figure is the median over repetitions, the two widths alternating (which one goes first
swaps every repetition). Target: each 65k figure within 1.5× of the 4.6k one.

The data roots are synthetic, not a real discovery (a 65k discovery is bench/discovery.py's
subject): written directly with the project's own writers — SAE weights with
core.formats.saelens.save_saelens, the features folder with core.features.writer.write from a
synthetic `Discovered` (every latent with realistically shaped values: log-uniform frequencies
over 1M tokens with a few dead latents, log-normal activations, exact-looking histograms, 20 top
and 10×5 quantile examples of 13-token windows of real SmolLM2 token strings, 8 co-active
latents each), and the registry rows with storage.registry (replace_features, as the discover
job records them; a quarter of the latents labeled). The 4.6k SAE has a 400-step training history,
the 65k one a 5,000-step history (a long run). Roots are built once under
$MISTUDIO_BENCH_CACHE/browser-<width> and reused.

    .venv/bin/python -m bench.browser [--reps 5] [--no-record]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench._common import CACHE, append_result, load_avg, median, model_dir, ok, table

WIDTHS = (4608, 65536)
D_IN = 576
TOKENS = 1_000_000
ROOT_VERSION = "2"  # bump when the synthetic root changes, so cached roots are rebuilt
HISTORY = {4608: 400, 65536: 5000}
SEARCH = "ing"
TARGET = 1.5
CHROMIUM = os.environ.get("MISTUDIO_CHROMIUM", "/usr/bin/chromium")


# --------------------------------------------------------------------------- synthetic data roots


def _table(rng, d_sae: int, slots: int, filled: np.ndarray, max_act: np.ndarray, pool: np.ndarray,
           preferred: np.ndarray, sorted_desc: bool):
    """A discovery table ([d_sae, slots] fields of core.features.tables) with `filled` slots per
    latent holding examples: windows of pool tokens whose centre is mostly the latent's own tokens."""
    import torch

    from core.features.config import DiscoverConfig

    cfg = DiscoverConfig()
    w = cfg.window_before + 1 + cfg.window_after
    m = cfg.n_coactive + 1
    held = np.arange(slots)[None, :] < filled[:, None]
    frac = rng.uniform(0.05, 1.0, (d_sae, slots)).astype(np.float32)
    if sorted_desc:
        frac = -np.sort(-frac, axis=1)
        frac[:, 0] = 1.0
    value = np.where(held, frac * max_act[:, None], 0).astype(np.float32)
    win_tokens = pool[rng.integers(0, len(pool), (d_sae, slots, w))]
    own = preferred[np.arange(d_sae)[:, None], rng.integers(0, preferred.shape[1], (d_sae, slots))]
    centre = np.where(rng.random((d_sae, slots)) < 0.7, own, win_tokens[:, :, cfg.window_before])
    win_tokens[:, :, cfg.window_before] = centre
    win_acts = (rng.random((d_sae, slots, w)) < 0.3) * rng.uniform(0, 0.6, (d_sae, slots, w)) * value[:, :, None]
    win_acts[:, :, cfg.window_before] = value
    win_tokens[~held] = -1
    co_lat = rng.integers(0, d_sae, (d_sae, slots, m))
    co_val = np.where(held[:, :, None], rng.uniform(0.1, 3.0, (d_sae, slots, m)), 0).astype(np.float32)
    row_id = rng.integers(0, 40_000, (d_sae, slots))
    t = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(dt)
    return {"key": t(np.where(held, value, -np.inf), torch.float32), "value": t(value, torch.float32),
            "row_id": t(row_id, torch.long), "pos": t(rng.integers(8, 250, (d_sae, slots)), torch.long),
            "doc": t(row_id, torch.long), "win_tokens": t(win_tokens, torch.long),
            "win_acts": t(win_acts, torch.float32), "co_lat": t(co_lat, torch.long), "co_val": t(co_val, torch.float32)}


def synthetic_discovered(d_sae: int, vocab: int, seed: int = 0):
    """A `core.features.accumulator.Discovered` with realistic shapes for every latent."""
    import torch

    from core.features.accumulator import Discovered
    from core.features.config import DiscoverConfig
    from core.features.schema import HIST_EDGES

    cfg = DiscoverConfig()
    rng = np.random.default_rng(seed)
    frequency = 10 ** rng.uniform(-6, -1, d_sae)
    frequency[rng.random(d_sae) < 0.02] = 0  # dead latents
    n_fired = np.round(frequency * TOKENS).astype(np.int64)
    max_act = rng.lognormal(1.0, 0.6, d_sae).astype(np.float32) * (n_fired > 0)
    mean_act = (max_act * rng.uniform(0.2, 0.5, d_sae)).astype(np.float32)
    pool = rng.choice(vocab, min(vocab, 8000), replace=False)
    weights = 1.0 / (np.arange(len(pool)) + 10.0)
    pool = rng.choice(pool, 200_000, p=weights / weights.sum())  # Zipf-like token frequencies
    preferred = pool[rng.integers(0, len(pool), (d_sae, 3))]
    top = _table(rng, d_sae, cfg.top_k, np.minimum(n_fired, cfg.top_k), max_act, pool, preferred, True)
    sample = _table(rng, d_sae, cfg.reservoir, np.minimum(n_fired, cfg.reservoir), max_act, pool, preferred,
                    False)
    hist = np.zeros((d_sae, len(HIST_EDGES) + 1), dtype=np.int64)
    centre = np.clip(np.searchsorted(HIST_EDGES, np.maximum(mean_act, 1e-6)), 2, len(HIST_EDGES) - 2)
    share = n_fired[:, None] * np.array([0.1, 0.2, 0.4, 0.2, 0.1])[None, :]
    for j, off in enumerate(range(-2, 3)):
        hist[np.arange(d_sae), centre + off] += np.floor(share[:, j]).astype(np.int64)
    hist[np.arange(d_sae), centre] += n_fired - hist.sum(1)
    return Discovered(top=top, sample=sample, n_fired=torch.from_numpy(n_fired),
                      sum_act=torch.from_numpy(mean_act.astype(np.float64) * n_fired),
                      max_act=torch.from_numpy(max_act), hist=torch.from_numpy(hist), tokens=TOKENS, seen=TOKENS,
                      outliers=[])


def _history(steps: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(steps):
        s = (i + 1) * 5
        fvu = 0.15 + 0.8 * np.exp(-i / (steps / 8)) + rng.normal(0, 0.01)
        out.append({"step": s, "tokens": s * 4096, "loss": fvu * 1.02, "mse": fvu * 0.03, "fvu": fvu, "l0": 32.0,
                    "dead_frac": max(0.0, 0.3 * np.exp(-i / (steps / 5))), "lr": 3e-4})
    return out


def build_root(home: Path, d_sae: int, tokenizer) -> None:
    """A data root holding one registered, discovered TopK SAE of width `d_sae` (see the module doc)."""
    from core.features import store
    from core.features.config import DiscoverConfig
    from core.features.schema import REGISTRY_COLUMNS
    from core.features.writer import write
    from core.formats.saelens import save_saelens
    from core.sae.registry import build_sae
    from storage import Settings
    from storage.artifacts import Artifacts
    from storage.registry import SAE, Registry

    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    settings = Settings.from_env({"MISTUDIO_HOME": str(home)})
    artifacts = Artifacts(settings.home)
    sae_id = f"sae-bench-{d_sae}"
    t0 = time.monotonic()
    sae = build_sae("topk", D_IN, d_sae, k=32)
    cfg = sae.config(hook_name="blocks.15.hook_resid_post", model_name="smollm2-135m", context_size=256)
    save_saelens(sae, cfg, artifacts.sae(sae_id))
    decode = lambda ids: [tokenizer.decode([i]) for i in ids]
    write(artifacts.features(sae_id), synthetic_discovered(d_sae, len(tokenizer)), decode, DiscoverConfig())
    registry = Registry.of(settings)
    registry.add(SAE(id=sae_id, name=f"smollm2-135m/bench-{d_sae}", model_id=None,
                     hook_name="blocks.15.hook_resid_post", architecture="topk", d_in=D_IN, d_sae=d_sae,
                     sae_config=cfg.type_config.to_dict(), path=str(artifacts.sae(sae_id)),
                     metrics={"fvu": 0.16, "l0": 32.0, "dead_frac": 0.02, "explained_variance": 0.84},
                     history=_history(HISTORY[d_sae]), features_path=str(artifacts.features(sae_id))))
    rows = store.feature_rows(artifacts.features(sae_id), REGISTRY_COLUMNS)
    registry.replace_features(sae_id, rows)
    cats = ["syntax", "semantic", "token", "other"]
    registry.update_features(sae_id, [{"latent": r["latent"], "label": f"{(r['top_tokens'] or ['?'])[0].strip()} "
                                       "tokens", "category": cats[r["latent"] % 4], "label_source": "heuristic"}
                                      for r in rows if r["latent"] % 4 == 0 and r["n_fired"] > 0])
    registry.close()
    (home / ".bench-root").write_text(ROOT_VERSION)
    print(f"[bench] built {home} ({d_sae:,} latents) in {time.monotonic() - t0:.0f} s", flush=True)


def data_root(d_sae: int) -> Path:
    home = CACHE / f"browser-{d_sae}"
    marker = home / ".bench-root"
    if not (marker.is_file() and marker.read_text() == ROOT_VERSION):
        from transformers import AutoTokenizer

        build_root(home, d_sae, AutoTokenizer.from_pretrained(model_dir()))
    return home


# --------------------------------------------------------------------------- serving and driving


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MISTUDIO_", "RAY_ADDRESS"))}
    env.update(MISTUDIO_HOME=str(home), MISTUDIO_WORKER_CPUS="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return env


def serve(home: Path) -> tuple[subprocess.Popen, str]:
    from tests.test_browser import _free_port, _wait_http

    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "ui.cli", "ui", "--port", str(port)], env=_env(home),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_http(f"http://localhost:{port}/_stcore/health", 300)
    return ui, f"http://localhost:{port}"


def stop(ui: subprocess.Popen, home: Path) -> None:
    ui.terminate()
    ui.wait(30)
    subprocess.run([sys.executable, "-m", "ui.cli", "stop"], env=_env(home), capture_output=True, timeout=120)


def _idle(page) -> None:
    """Wait until the app's script run has finished (Streamlit marks its root element)."""
    page.wait_for_function("() => document.querySelector(\"[data-testid='stApp']\")"
                           "?.getAttribute('data-test-script-state') === 'notRunning'")


def _no_error(page) -> None:
    if page.get_by_text("Something went wrong").count() or page.locator("[data-testid='stException']").count():
        raise AssertionError("the page shows an error: " + page.inner_text("body")[:2000])


def expected(home: Path, d_sae: int) -> dict:
    """What the search shows (total, and a latent on its page to open), read from the registry."""
    from storage import Settings
    from storage.registry import Registry
    from core.features.schema import FeatureQuery

    reg = Registry.of(Settings.from_env({"MISTUDIO_HOME": str(home)}))
    try:
        found = reg.feature_page(f"sae-bench-{d_sae}", FeatureQuery(live_only=True, limit=500, search=SEARCH))
    finally:
        reg.close()
    return {"total": found.total, "open": [r["latent"] for r in found.rows[3:6]]}


def measure(browser, url: str, want: dict, rep: int) -> dict[str, float]:
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(180_000)
    out = {}
    t0 = time.perf_counter()
    page.goto(url + "/features")
    page.get_by_text(re.compile(r"Top \d+ contexts")).first.wait_for()
    _idle(page)
    out["features page"] = time.perf_counter() - t0
    _no_error(page)

    box = page.get_by_label("Search tokens and labels")
    box.fill(SEARCH)
    total = want["total"]
    shown = re.compile(rf"^(?:{total:,} of |.* of {total:,} matching)")
    t0 = time.perf_counter()
    box.press("Enter")
    page.get_by_text(shown).first.wait_for()
    page.get_by_text(re.compile(r"Top \d+ contexts")).first.wait_for()
    _idle(page)
    out["search"] = time.perf_counter() - t0
    _no_error(page)

    latent = want["open"][rep % len(want["open"])]
    page.get_by_role("combobox", name="Latent", exact=True).click()
    page.keyboard.type(f"{latent} · ")
    option = page.get_by_role("option", name=re.compile(rf"^{latent} · "))
    option.first.wait_for()
    t0 = time.perf_counter()
    option.first.click()
    page.get_by_role("heading", name=re.compile(rf"^Latent {latent}\b")).first.wait_for()
    page.get_by_text(re.compile(r"Top \d+ contexts")).first.wait_for()
    _idle(page)
    out["feature page"] = time.perf_counter() - t0
    _no_error(page)
    ctx.close()

    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = ctx.new_page()
    page.set_default_timeout(180_000)
    t0 = time.perf_counter()
    page.goto(url + "/saes")
    page.get_by_role("heading", name="Export").first.wait_for()
    page.get_by_text("Download SAELens folder").first.wait_for()
    _idle(page)
    out["SAEs page"] = time.perf_counter() - t0
    _no_error(page)
    ctx.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-record", action="store_true")
    a = ap.parse_args()
    if not Path(CHROMIUM).exists():
        sys.exit(f"bench/browser.py needs Debian's chromium at {CHROMIUM} (apt-get install chromium)")
    homes = {w: data_root(w) for w in WIDTHS}
    wants = {w: expected(homes[w], w) for w in WIDTHS}
    load_before = load_avg()
    servers = {}
    try:
        for w in WIDTHS:
            servers[w] = serve(homes[w])
        from playwright.sync_api import sync_playwright

        times: dict[int, list[dict]] = {w: [] for w in WIDTHS}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking"])
            for w in WIDTHS:  # warm-up: the first session of each server imports and connects
                measure(browser, servers[w][1], wants[w], 0)
            for rep in range(a.reps):
                for w in (WIDTHS if rep % 2 == 0 else WIDTHS[::-1]):
                    t = measure(browser, servers[w][1], wants[w], rep)
                    times[w].append(t)
                    print(f"[bench] rep {rep + 1} {w:,} latents: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()),
                          flush=True)
            browser.close()
    finally:
        for w, (ui, _) in servers.items():
            stop(ui, homes[w])
    report(times, wants, a, load_before)


def report(times: dict[int, list[dict]], wants: dict, a, load_before: str) -> None:
    small, large = WIDTHS
    rows, met_all = [], True
    for key in times[small][0]:
        s = median(t[key] for t in times[small])
        g = median(t[key] for t in times[large])
        met = g <= TARGET * s
        met_all &= met
        rows.append([key, f"{s:.2f}", f"{g:.2f}", f"{g / s:.2f}×", f"≤ {TARGET}×", ok(met)])
    text = table(["measure", f"{small:,} latents (s)", f"{large:,} latents (s)", "ratio", "target", "status"], rows)
    print(text)
    if a.no_record:
        return
    body = (f"Sizes: one TopK SAE per data root (d_in {D_IN}; {small:,} vs {large:,} latents; synthetic features "
            f"written by core.features.writer over {TOKENS:,} tokens, examples for every live latent; training "
            f"history {HISTORY[small]:,} vs {HISTORY[large]:,} log steps). Both dashboards served at once "
            f"(`mistudio ui`), driven by headless Chromium; medians of {a.reps} repetitions after a warm-up, "
            f"widths alternating. Search {SEARCH!r}: {wants[small]['total']:,} vs {wants[large]['total']:,} "
            "matching latents (live only).\n\n" + text + "\n")
    append_result("dashboard at 4,608 vs 65,536 latents (bench/browser.py)", body, load_before=load_before)


if __name__ == "__main__":
    main()
