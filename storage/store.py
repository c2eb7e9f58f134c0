"""An object-store artifact root: MISTUDIO_ARTIFACT_ROOT (s3://, gs://, abfs://, hdfs:// or
file:// — whatever pyarrow's filesystem layer opens), with each node's data root as its working
copy.

torch, safetensors, transformers and memory-mapped Parquet need local files, so every process
still reads and writes artifacts under MISTUDIO_HOME exactly as without a store. With one:

- the process that finished an artifact (a folder renamed into place whole) `push`es it: its
  files first, then a manifest (`_mistudio.json`: a fresh token and the file list). The manifest
  is what makes an artifact visible in the store, so a reader never takes a half-uploaded one,
  and a replaced artifact (features discovered again) gets a new token;
- a process that needs an artifact calls `pull`: when the store has it and this node lacks it
  or holds an older copy (its token differs), the files are downloaded into a temporary sibling
  and renamed into place.

The registry records artifact paths relative to MISTUDIO_HOME (storage.portable): that relative
path is also the artifact's key under the store's prefix.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from core.errors import UserError
from core.io import atomic_dir, atomic_file

MANIFEST = "_mistudio.json"


def open_root(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of an artifact root URI; a one-line error when it cannot be opened."""
    try:
        fs, base = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:  # (pyarrow's ArrowInvalid and ArrowIOError are these)
        from storage.registry import masked_url  # (no password of the URI in the message, nor in pyarrow's)

        shown = masked_url(uri)
        reason = (str(e).splitlines() or [type(e).__name__])[0].replace(uri, shown)
        raise UserError(f"MISTUDIO_ARTIFACT_ROOT={shown!r} cannot be opened ({reason}); "
                        "give a URI such as s3://bucket/prefix or file:///shared/path") from None
    return fs, base.rstrip("/")


class ArtifactStore:
    def __init__(self, uri: str, home: Path):
        self.uri, self.home = uri, Path(home).resolve()
        self.fs, self.base = open_root(uri)
        self.fs.create_dir(self.base, recursive=True)

    def _key(self, path: Path) -> str | None:
        """The store path of a local artifact path; None for a path outside the data root (a
        model folder the user registered in place stays where it is)."""
        try:
            rel = Path(path).resolve().relative_to(self.home)
        except ValueError:
            return None
        return f"{self.base}/{rel.as_posix()}"

    @staticmethod
    def _token_file(path: Path) -> Path:
        """Beside the artifact, not in it: which stored version this node's copy is."""
        return path.parent / f".{path.name}.stored"

    def push(self, path: str | os.PathLike) -> None:
        """Upload a finished artifact folder under the data root, replacing the stored one."""
        path = Path(path)
        key = self._key(path)
        if key is None or not path.is_dir():
            return
        files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                       if p.is_file() and not p.name.startswith(".tmp-"))
        try:
            self.fs.delete_file(f"{key}/{MANIFEST}")  # first, so no reader takes a half-replaced artifact
        except FileNotFoundError:
            pass
        self.fs.delete_dir_contents(key, missing_dir_ok=True)
        self.fs.create_dir(key, recursive=True)  # (a local root needs the folder to copy into)
        pafs.copy_files(str(path), key, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)
        token = uuid.uuid4().hex
        with self.fs.open_output_stream(f"{key}/{MANIFEST}") as f:
            f.write(json.dumps({"token": token, "files": files}).encode())
        with atomic_file(self._token_file(path)) as tmp:
            tmp.write_text(token)

    def pull(self, path: str | os.PathLike) -> Path:
        """`path`, downloaded first when the store holds a version this node lacks. `path` may
        also lie inside a stored artifact (one hook's folder of an activation set): then that
        whole artifact is fetched."""
        path = Path(path)
        for artifact in (path, *path.parents):
            key = self._key(artifact)
            if key is None or artifact.parent.resolve() == self.home:  # not below a kind's folder
                return path
            manifest = self._manifest(key)
            if manifest is not None:
                self._fetch(artifact, key, manifest)
                return path
        return path

    def _fetch(self, path: Path, key: str, manifest: dict) -> None:
        mine = self._token_file(path)
        if path.exists() and mine.is_file() and mine.read_text() == manifest["token"]:
            return
        with atomic_dir(path) as tmp:
            for rel in manifest["files"]:  # only what the manifest lists: never a half-replaced upload
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{key}/{rel}", str(tmp / rel), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
            if self._manifest(key) != manifest:
                raise OSError(f"{key} was replaced while it was being fetched; try again")
        with atomic_file(mine) as tmp:
            tmp.write_text(manifest["token"])

    def has(self, path: str | os.PathLike) -> bool:
        key = self._key(Path(path))
        return bool(key and self._manifest(key))

    def delete(self, path: str | os.PathLike) -> None:
        """Remove an artifact's stored copy and this node's record of it (a scratch folder, say;
        the local folder is the caller's to remove)."""
        path = Path(path)
        key = self._key(path)
        if key is not None and self.fs.get_file_info(key).type == pafs.FileType.Directory:
            self.fs.delete_dir(key)
        self._token_file(path).unlink(missing_ok=True)

    def _manifest(self, key: str) -> dict | None:
        try:
            with self.fs.open_input_stream(f"{key}/{MANIFEST}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
