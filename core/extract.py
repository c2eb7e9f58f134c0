"""Hooked extraction: activations of every real (unpadded) token, streamed to Parquet shards.

Positions holding a token id listed in `exclude_token_ids` (BOS and other special tokens, when
the user asks) are dropped exactly like padding; their count is kept in stats.json.

Layout, one folder per hook under the extraction folder:

    {out_dir}/{hook_name}/shard-00000.parquet, ...   act: fixed_size_list<float32, d_model>
                                                    row_id: int64, pos: int32, token_id: int32
    {out_dir}/{hook_name}/stats.json                 HookStats

`act` as a fixed-size list keeps the values one contiguous float32 buffer, so readers get
[N, d] numpy arrays without copying (`iter_activations`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from core.data import TokenBatch, iter_batches, read_stats, total_tokens
from core.errors import UserError
from core.hooks import parse_hook_name, run_hooked, validate_hooks
from core.io import atomic_dir, intact
from core.progress import Meter

NORM_SAMPLE = 100_000
"""Size of the reservoir of token norms the median is taken from."""


@dataclass
class HookStats:
    """Summary of the activations extracted at one hook site."""

    hook_name: str
    tokens: int
    """Token positions extracted (padding excluded)."""
    d_model: int
    mean_norm: float
    """Mean L2 norm of a token's activation vector."""
    median_norm: float
    """Median L2 norm, from a uniform sample of up to NORM_SAMPLE tokens."""
    max_norm: float
    mean: float
    """Mean over all tokens and dimensions."""
    std: float
    """Standard deviation over all tokens and dimensions."""
    excluded_special: int = 0
    """Real tokens dropped because their id was in `exclude_token_ids` (a default, so stats.json
    files written before the option existed still load)."""

    def to_dict(self) -> dict:
        return asdict(self)


class _RunningStats:
    """Exact sums in float64 plus a reservoir sample of norms for the median."""

    def __init__(self, seed: int = 0):
        self.n = 0
        self.d = 0
        self.norm_sum = 0.0
        self.max_norm = 0.0
        self.total = 0.0
        self.total_sq = 0.0
        self.reservoir = np.empty(NORM_SAMPLE, dtype=np.float32)
        self.rng = np.random.default_rng(seed)

    def update(self, acts: np.ndarray) -> None:
        if len(acts) == 0:
            return
        a64 = acts.astype(np.float64)
        norms = np.sqrt((a64 * a64).sum(axis=1))
        self.d = acts.shape[1]
        self.norm_sum += float(norms.sum())
        self.max_norm = max(self.max_norm, float(norms.max()))
        self.total += float(a64.sum())
        self.total_sq += float((a64 * a64).sum())
        self._sample(norms.astype(np.float32))
        self.n += len(acts)

    def _sample(self, norms: np.ndarray) -> None:
        # Reservoir sampling (Algorithm R), vectorised over a batch of new items.
        fill = min(max(NORM_SAMPLE - self.n, 0), len(norms))
        self.reservoir[self.n:self.n + fill] = norms[:fill]
        rest = norms[fill:]
        if len(rest):
            seen = self.n + fill + np.arange(len(rest))  # items seen before each new one
            slots = (self.rng.random(len(rest)) * (seen + 1)).astype(np.int64)
            keep = slots < NORM_SAMPLE
            self.reservoir[slots[keep]] = rest[keep]

    def result(self, hook_name: str) -> HookStats:
        n = max(self.n, 1)
        count = max(self.n * self.d, 1)
        mean = self.total / count
        sample = self.reservoir[:min(self.n, NORM_SAMPLE)]
        return HookStats(
            hook_name=hook_name, tokens=self.n, d_model=self.d,
            mean_norm=self.norm_sum / n,
            median_norm=float(np.median(sample)) if len(sample) else 0.0,
            max_norm=self.max_norm, mean=mean,
            std=float(np.sqrt(max(self.total_sq / count - mean * mean, 0.0))),
        )


class _ActivationWriter:
    """Streams one hook's activations into Parquet shards of `shard_tokens` tokens, one row group
    of `group_tokens` at a time, so memory holds at most a row group (not a whole shard) whatever
    the corpus size."""

    def __init__(self, folder: Path, shard_tokens: int, group_tokens: int = 2048):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.group_tokens = min(group_tokens, shard_tokens)
        folder.mkdir(parents=True)
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        self.buffered = 0
        self.shards = 0  # shards finished
        self.in_shard = 0  # tokens in the open shard
        self.writer: pq.ParquetWriter | None = None

    def _room(self) -> int:
        """Tokens until the current row group or shard is full."""
        return min(self.group_tokens, self.shard_tokens - self.in_shard)

    def add(self, acts: np.ndarray, row_ids: np.ndarray, pos: np.ndarray, token_ids: np.ndarray) -> None:
        self.parts.append((acts, row_ids, pos, token_ids))
        self.buffered += len(acts)
        while self.buffered and self.buffered >= self._room():
            self._flush(self._room())

    def close(self) -> None:
        if self.buffered:
            self._flush(self.buffered)
        if self.writer is not None:
            self.writer.close()
            self.writer, self.shards = None, self.shards + 1

    def _flush(self, n: int) -> None:
        cols = [np.concatenate(c) if len(self.parts) > 1 else c[0] for c in zip(*self.parts)]
        self._write([c[:n] for c in cols])
        self.buffered -= n
        self.parts = [tuple(c[n:] for c in cols)] if self.buffered else []

    def _write(self, cols: list[np.ndarray]) -> None:
        acts, row_ids, pos, token_ids = cols
        table = pa.Table.from_arrays(
            [pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(acts).reshape(-1)), acts.shape[1]),
             pa.array(row_ids), pa.array(pos), pa.array(token_ids)],
            names=["act", "row_id", "pos", "token_id"])
        if self.writer is None:
            # Float activations barely compress; skipping compression keeps writes and reads fast.
            self.writer = pq.ParquetWriter(self.folder / f"shard-{self.shards:05d}.parquet", table.schema,
                                           compression="none", use_dictionary=False)
        self.writer.write_table(table)
        self.in_shard += len(acts)
        if self.in_shard == self.shard_tokens:
            self.writer.close()
            self.writer, self.shards, self.in_shard = None, self.shards + 1, 0


def extract(model, batches: Iterable[TokenBatch], hook_names: list[str], out_dir,
            shard_tokens: int = 16384, progress: Callable[[dict], None] | None = None,
            should_cancel: Callable[[], bool] | None = None, *,
            total_tokens: int | None = None, exclude_token_ids: Sequence[int] = ()) -> dict[str, HookStats]:
    """Run the model over `batches` and save the activations of every unpadded token.

    The forward stops after the deepest hooked layer. Memory stays bounded by one row group per
    hook plus one batch. `out_dir` appears only when the whole run succeeded. `total_tokens`
    (optional) lets progress report a total and an ETA; progress counts excluded tokens as
    done, since `total_tokens` counts every real token. Positions whose token id is in
    `exclude_token_ids` (pass `tokenizer.all_special_ids` to drop BOS/EOS/...) are not written
    and not in the stats: BOS in particular carries activations far larger than any text token.
    """
    validate_hooks(model, hook_names)
    if shard_tokens < 1:
        raise UserError(f"shard size must be positive, got {shard_tokens} tokens")
    names = list(dict.fromkeys(hook_names))
    stats = {name: _RunningStats() for name in names}
    excluded_ids = torch.tensor(sorted(set(int(i) for i in exclude_token_ids)), dtype=torch.long)
    written = excluded = 0
    meter = Meter(progress, "extract", total=total_tokens, should_cancel=should_cancel, what="extraction")
    with atomic_dir(out_dir) as tmp:
        writers = {name: _ActivationWriter(tmp / name, shard_tokens) for name in names}
        pending: list[tuple[TokenBatch, _Staged]] = []
        for batch in itertools.chain(batches, [None]):
            if batch is not None:
                meter.check()
                pending.append((batch, _Staged(_forward(model, batch, names))))
            # On a GPU a batch is written once the next one's forward is queued, so the host's
            # work overlaps the device's; on the CPU at once.
            while pending and (batch is None or len(pending) == 2 or pending[0][1].event is None):
                kept, dropped = _write_batch(*pending.pop(0), writers, stats, excluded_ids)
                written, excluded = written + kept, excluded + dropped
                meter.add(kept + dropped)
        if written == 0:
            if excluded:
                raise UserError(f"no tokens to extract: all {excluded} tokens are excluded special tokens; "
                                "turn off excluding special tokens or check the dataset")
            raise UserError("no tokens to extract: the batches were empty; check the dataset")
        results = {}
        for name in names:
            writers[name].close()
            results[name] = dataclasses.replace(stats[name].result(name), excluded_special=excluded)
            (tmp / name / "stats.json").write_text(json.dumps(results[name].to_dict(), indent=1))
    return results


def _forward(model, batch: TokenBatch, names: list[str]) -> dict[str, torch.Tensor]:
    """The hooked activations of one batch, on the model's device."""
    device = next(model.parameters()).device
    ids, mask = batch.input_ids, batch.attention_mask
    if device.type == "cuda":
        ids, mask = (t.pin_memory().to(device, non_blocking=True) for t in (ids, mask))
    try:
        return run_hooked(model, ids, mask, names)
    except IndexError as e:  # a learned position table (GPT-2's wpe) shorter than the rows
        raise UserError(f"the model failed on rows of {batch.input_ids.shape[1]} tokens ({e}); its position "
                        "table is probably shorter: re-tokenize the dataset with a smaller context length") from e


class _Staged:
    """Activations on their way to host memory: on CUDA non-blocking copies into pinned buffers
    and the event that marks them done (no sync until they are read); elsewhere the tensors."""

    def __init__(self, acts: dict[str, torch.Tensor]):
        self.event = None
        if any(a.device.type == "cuda" for a in acts.values()):
            acts = {k: torch.empty(a.shape, dtype=a.dtype, pin_memory=True).copy_(a, non_blocking=True)
                    for k, a in acts.items()}
            self.event = torch.cuda.Event()
            self.event.record()
        self.acts = acts

    def get(self) -> dict[str, torch.Tensor]:
        if self.event is not None:
            self.event.synchronize()
        return self.acts



def _write_batch(batch: TokenBatch, staged: _Staged, writers, stats, excluded_ids: torch.Tensor) -> tuple[int, int]:
    """Keep a batch's real tokens that are not excluded and hand them to the writers (all on the
    host). Returns (tokens written, real tokens excluded)."""
    acts = staged.get()
    real = batch.attention_mask.bool()
    mask = real & ~torch.isin(batch.input_ids, excluded_ids)
    b, t = mask.shape
    row_ids = batch.row_ids.view(b, 1).expand(b, t)[mask].numpy()
    pos = torch.arange(t, dtype=torch.int32).view(1, t).expand(b, t)[mask].numpy()
    token_ids = batch.input_ids[mask].to(torch.int32).numpy()
    for name, a in acts.items():
        kept = a[mask].numpy()
        stats[name].update(kept)
        writers[name].add(kept, row_ids, pos, token_ids)
    n = int(mask.sum())
    return n, int(real.sum()) - n


def _shards(hook_dir) -> list[Path]:
    files = sorted(Path(hook_dir).glob("shard-*.parquet"))
    if not files:
        raise UserError(f"no activation shards in {hook_dir}; run the extraction first")
    return files


DAMAGED_ACTIVATIONS = "delete the activation set (mistudio extract delete ID) and extract again"


def iter_activations(hook_dir, batch_tokens: int = 4096) -> Iterator[np.ndarray]:
    """Yield float32 [N, d_model] arrays (N ≤ batch_tokens), shard by shard, in token order.

    The arrays are zero-copy views of Arrow buffers and therefore read-only: copy before
    modifying in place (torch.from_numpy of them warns; use torch.tensor or np.array).
    """
    for shard in _shards(hook_dir):
        with intact(shard, DAMAGED_ACTIVATIONS):
            pf = pq.ParquetFile(shard)
            d = pf.schema_arrow.field("act").type.list_size
            for rb in pf.iter_batches(batch_size=batch_tokens, columns=["act"]):
                # flatten() respects a slice offset, unlike .values; both are zero-copy.
                yield rb.column(0).flatten().to_numpy(zero_copy_only=True).reshape(-1, d)


def read_hook_stats(hook_dir) -> HookStats:
    """The stats.json written by `extract` for one hook."""
    path = Path(hook_dir) / "stats.json"
    if not path.is_file():
        raise UserError(f"no stats.json in {hook_dir}; run the extraction first")
    return HookStats(**json.loads(path.read_text()))


def count_activations(hook_dir) -> int:
    """Number of token activations stored for one hook (from Parquet metadata, no data read)."""
    with intact(hook_dir, DAMAGED_ACTIVATIONS):
        return sum(pq.ParquetFile(f).metadata.num_rows for f in _shards(hook_dir))


def extract_activations(model, tokenizer, dataset_dir: Path, hook_names: list[str], out_dir: Path,
                        batch_size: int = 8, max_tokens: int | None = None,
                        progress: Callable[[dict], None] | None = None,
                        should_cancel: Callable[[], bool] | None = None,
                        exclude_token_ids: Sequence[int] = ()) -> dict[str, HookStats]:
    """Run the hooked forward over a tokenized dataset and stream activations to Parquet.
    On a GPU the rows per forward are chosen from its free memory (at least `batch_size`)."""
    from core.models.memory import gpu_batch_size

    validate_hooks(model, hook_names)
    deepest = max(parse_hook_name(n)[0] for n in hook_names)
    per_token = 8 * model.config.hidden_size * len(hook_names)  # each site's float32 copy, on device and pinned
    batch_size = gpu_batch_size(model, batch_size, read_stats(dataset_dir).context_length, deepest, per_token)
    batches = iter_batches(dataset_dir, batch_size, tokenizer.pad_token_id, max_tokens=max_tokens)
    return extract(model, batches, hook_names, out_dir, progress=progress, should_cancel=should_cancel,
                           total_tokens=total_tokens(dataset_dir, max_tokens), exclude_token_ids=exclude_token_ids)
