"""Who writes a label: one file per explainer (heuristic; llm with its prompt beside it)."""
