"""One file per schema revision, oldest first (0001_initial.py matches the original `create_all`)."""
