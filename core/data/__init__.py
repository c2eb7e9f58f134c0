"""Text datasets: documents from the built-in corpora, user files or Hugging Face (`texts`),
tokenized into Parquet shards (`shards`), read back as padded batches (`batches`)."""

from core.data.batches import TokenBatch, decode_tokens, iter_batches, special_token_ids
from core.data.shards import (DatasetStats, RowLengths, read_rows, read_stats, row_lengths, shard_files,
                              tokenize_dataset, tokenize_to_shards, total_tokens)
from core.data.texts import (BUILTIN, CORPORA, FILE_TYPES, MAX_DOC_CHARS, builtin_corpus, iter_texts, load_texts,
                             stdlib_source)

__all__ = ["TokenBatch", "decode_tokens", "iter_batches", "special_token_ids", "DatasetStats", "RowLengths", "read_rows", "read_stats",
           "row_lengths", "shard_files", "tokenize_dataset", "tokenize_to_shards", "total_tokens", "BUILTIN",
           "CORPORA", "FILE_TYPES", "MAX_DOC_CHARS", "builtin_corpus", "iter_texts", "load_texts", "stdlib_source"]
