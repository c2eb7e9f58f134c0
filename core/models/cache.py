"""The models a worker keeps loaded."""

from __future__ import annotations

import torch

class ModelCache(dict):
    """Loaded (model, tokenizer) pairs by model id, at most `limit` of them: adding one more
    evicts the least recently used and gives its memory back (the Python objects, then the CUDA
    allocator's cache), so a worker serving many models does not grow without bound."""

    def __init__(self, limit: int = 2):
        super().__init__()
        self.limit = max(1, limit)

    def __getitem__(self, key):
        value = super().pop(key)
        super().__setitem__(key, value)  # now the most recently used
        return value

    def __setitem__(self, key, value) -> None:
        super().pop(key, None)
        self.make_room()
        super().__setitem__(key, value)

    def make_room(self) -> None:
        """Evict until one more fits: call it before loading, so two models never coexist."""
        while len(self) >= self.limit:
            super().pop(next(iter(self)))
            self.release()

    @staticmethod
    def release() -> None:
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
