"""What a format module gives the registry in `core.formats`: how to recognise its folders, which
hook they name, and how to load one as a miStudio SAE."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from core.sae import SAE, SAEConfig

Resolve = Callable[[str], str]
"""An importer calls it with the hook the files name ("" when they do not) before loading weights;
it returns the hook to record (the files' hook, else the caller's) or raises."""


class Format(NamedTuple):
    """One SAE file format, as `core.formats` registers it."""

    name: str
    """The name users pass as `format` (and FoundSAE.format)."""
    markers: tuple[str, ...]
    """Weights files whose presence marks a folder as one SAE of this format."""
    config_files: tuple[str, ...]
    """Config files a user may point at instead of the folder."""
    read_hook: Callable[[Path], str]
    """The hook (TransformerLens name) the folder's files name; "" when they do not say."""
    owns_config: Callable[[Path], bool]
    """Whether a folder whose weights file is missing is this format's, told from its config
    (so the importer can say which file is missing)."""
    load: Callable[[Path, Resolve], tuple[SAE, SAEConfig]]
    """Read the folder: map its tensors to SAELens names and build the SAE with
    `core.formats.saelens.sae_from_tensors`."""
