"""Hugging Face model directories: config.json, (sharded) *.safetensors, tokenizer files."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lmserve.errors import ModelLoadError
from lmserve.loader.checkpoint import Checkpoint
from lmserve.loader.hf_config import model_config_from_hf


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(path, "file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(path, f"not valid JSON ({exc})") from None


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index, "has no 'weight_map'")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.exists():
                raise ModelLoadError(file, "shard listed in model.safetensors.index.json is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(directory, "no *.safetensors weights found")
    return files


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(file, f"corrupt or truncated safetensors file ({exc})") from None


def load_hf_directory(directory: Path) -> Checkpoint:
    from lmserve.tokenizer import Tokenizer

    config = model_config_from_hf(_read_json(directory / "config.json"), str(directory / "config.json"))
    files = _shard_files(directory)
    types: Counter = Counter()
    num_params = 0
    for file in files:
        with _open(file) as f:
            for name in f.keys():
                sl = f.get_slice(name)
                types[sl.get_dtype()] += 1
                shape = sl.get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                num_params += count

    def iter_tensors():
        for file in files:
            with _open(file) as f:
                for name in f.keys():
                    try:
                        yield name, f.get_tensor(name)
                    except (SafetensorError, OSError) as exc:
                        raise ModelLoadError(file, f"cannot read tensor {name!r} ({exc})") from None

    return Checkpoint(path=str(directory), format="safetensors", config=config,
                      tokenizer=Tokenizer.maybe_from_hf_dir(directory), tensor_types=dict(types),
                      num_params=num_params, _iter_tensors=iter_tensors)
