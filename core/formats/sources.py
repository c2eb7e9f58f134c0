"""Where SAEs to import come from: a local folder or file, an archive, or the Hugging Face Hub.

`open_source` turns what a user typed into a local path that `core.formats.find_saes` can search;
archives are unpacked so that nothing lands outside the work folder, and a Hub download fetches
only the subfolder named.
"""

from __future__ import annotations

import os
import re
import tarfile
import zipfile
from pathlib import Path

from core.errors import UserError

_ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.=-]+)*$")


def open_source(source: str, workdir: str | os.PathLike) -> Path:
    """A local path holding the SAE(s) named by `source`: a folder or file as it is; a .zip or
    .tar(.gz) archive unpacked into `workdir`; else a Hugging Face repo id, optionally with a
    subfolder ("google/gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82"), downloaded
    (only that subfolder) into `workdir`."""
    path = Path(source).expanduser()
    if path.exists():
        if path.is_file() and source.lower().endswith(_ARCHIVES):
            return _unpack(path, Path(workdir))
        return path
    if not _HUB_ID.match(source):
        raise UserError(f"{source} is neither an existing path nor a Hugging Face repo id (owner/name[/subfolder]); "
                        "check the path")
    return _download(source, Path(workdir))


def _unpack(archive: Path, workdir: Path) -> Path:
    out = workdir / "unpacked"
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():  # nothing may land outside `out`
                    if name.startswith("/") or ".." in Path(name).parts:
                        raise UserError(f"{archive.name} holds an unsafe path {name!r}; refusing to unpack it")
                z.extractall(out)
        else:
            with tarfile.open(archive) as t:
                t.extractall(out, filter="data")  # refuses links out, absolute paths and devices
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{archive.name} cannot be unpacked ({type(e).__name__}: {e}); check the archive") from None
    return out


def _download(source: str, workdir: Path) -> Path:
    from huggingface_hub import snapshot_download

    owner, name, *sub = source.split("/")
    subfolder = "/".join(sub)
    try:
        root = snapshot_download(f"{owner}/{name}", local_dir=workdir / "hub",
                                 allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as e:  # noqa: BLE001 — offline, unknown repo, gated: all one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"could not download {owner}/{name} from the Hugging Face Hub ({first}); check the id, "
                        "the network, or HF_TOKEN for a gated repo") from None
    path = Path(root) / subfolder
    if not path.exists():
        raise UserError(f"{owner}/{name} has no folder {subfolder!r}; check the path inside the repo")
    return path


# ---------------------------------------------------------------------------------- import
