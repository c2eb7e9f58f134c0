"""The models labels and scores are asked of: one file per client (local, openai)."""
