"""Safe readers of the files SAE formats ship (JSON, safetensors, .npz, PyTorch state dicts) and the
checks every importer shares. Each turns a broken file into a one-line `UserError` naming it, and
none executes code from a file (no pickle beyond `weights_only=True`)."""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from core.errors import UserError


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def need(path: Path, what: str) -> Path:
    if not path.is_file():
        raise UserError(f"{path} is missing; {what}")
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path} is not valid JSON ({one_line(e)}); re-save the SAE") from None


def read_json_object(path: Path) -> dict[str, Any]:
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a JSON object; re-save the SAE")
    return raw


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({one_line(e)}); "
                        "download or save it again") from None


def read_npz(path: Path) -> dict[str, torch.Tensor]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not isinstance(data, np.lib.npyio.NpzFile):
                raise ValueError("a single .npy array, not an .npz archive")
            arrays = {key: np.asarray(data[key]) for key in data.files}
    except (zipfile.BadZipFile, zlib.error, ValueError, OSError, EOFError, KeyError) as e:
        raise UserError(f"{path} is not a readable .npz file ({one_line(e)}); download it again") from None
    for key, array in arrays.items():
        if not np.issubdtype(array.dtype, np.number):
            raise UserError(f"{path}: array {key} has dtype {array.dtype}, not numbers; download it again")
    return {key: torch.from_numpy(array.astype(np.float32, copy=False)) for key, array in arrays.items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A plain PyTorch state dict, unpickled with weights_only=True (no arbitrary code)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means "not a usable file"
        raise UserError(f"{path} is not a readable PyTorch state dict ({one_line(e)}); "
                        "download or save it again") from None
    if isinstance(obj, dict) and {"ae", "optimizer"} <= obj.keys():
        raise UserError(f"{path} is a mid-training backup (biases still in training units), not a finished SAE; "
                        "use the ae.pt written at the end of training")
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path} is not a plain state dict of named tensors; save the SAE with "
                        "torch.save(ae.state_dict(), path)")
    return dict(obj)


def check_shapes(source: Path, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                 implied_by: str) -> None:
    """Tensors under their own project's names: present, and shaped as the config implies."""
    missing = [name for name in expected if name not in tensors]
    if missing:
        raise UserError(f"{source} lacks tensor(s) {', '.join(missing)}; it holds {', '.join(sorted(tensors))}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{name} in {source} has shape {list(tensors[name].shape)} but {implied_by} implies "
                            f"{list(shape)}; the config and the weights disagree, re-save the SAE")


def int_field(raw: dict[str, Any], key: str, default: Any, source: Path) -> int:
    """raw[key] (or `default`) as an int; a bool, a string or a fraction is refused."""
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise UserError(f"{source}: '{key}' must be an integer (got {value!r}); fix the config")
    return int(value)


def float32(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to(torch.float32) for name, t in tensors.items()}
