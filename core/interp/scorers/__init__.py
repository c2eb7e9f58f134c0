"""How good a label is: one file per scorer, each with its prompt beside it (base: what a scorer is)."""
