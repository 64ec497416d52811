"""Hugging Face model directories: config.json, (sharded) *.safetensors, tokenizer files.

Each shard's header is read and checked here before the safetensors library maps the file:
every tensor's dtype known, its `data_offsets` inside the file, its byte count that of its dtype
and shape, and no two tensors sharing bytes; then the config is checked against the tensors the
shards list (`sanity`), so an absurd config is refused before a model is built for it.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

from safetensors import SafetensorError, safe_open

from lmserve.config import ModelConfig
from lmserve.errors import ModelLoadError
from lmserve.loader.checkpoint import Checkpoint
from lmserve.loader.hf_config import model_config_from_hf
from lmserve.loader.sanity import check_layers, check_shapes
from lmserve.models import registry

# Bytes per element of the dtypes the safetensors format names.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
               "F64": 8, "C64": 8}
MAX_HEADER_BYTES = 100 * 2**20  # the largest header the safetensors library reads


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelLoadError(path, "file not found") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(path, f"not valid JSON ({exc})") from None


def _shard_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        content = _read_json(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict):
            raise ModelLoadError(index, "has no 'weight_map'")
        names = set(weight_map.values())
        bad = next((name for name in names if not isinstance(name, str) or Path(name).name != name), None)
        if bad is not None:
            raise ModelLoadError(index, f"weight_map names {bad!r}, not a file of the model directory")
        files = [directory / name for name in sorted(names)]
        for file in files:
            if not file.exists():
                raise ModelLoadError(file, "shard listed in model.safetensors.index.json is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(directory, "no *.safetensors weights found")
    return files


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(key for key in keys if keys.count(key) > 1)!r}")
    return dict(pairs)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_header(file: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors (name -> dtype, shape) a safetensors file lists, once its header is checked
    against the file: a `ModelLoadError` names the first bad entry. Reads the header only."""
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little")
            if len(prefix) < 8 or length > size - 8:
                raise ModelLoadError(file, f"corrupt or truncated safetensors file (header length "
                                           f"{length if len(prefix) == 8 else 'missing'}, file size {size} bytes)")
            if length > MAX_HEADER_BYTES:
                raise ModelLoadError(file, f"safetensors header of {length} bytes exceeds {MAX_HEADER_BYTES}")
            raw = f.read(length)
    except OSError as exc:
        raise ModelLoadError(file, f"cannot read ({exc})") from None
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise ModelLoadError(file, f"safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelLoadError(file, "safetensors header is not a JSON object")
    data_size = size - 8 - length
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise ModelLoadError(file, f"tensor {name!r}: header entry {entry!r:.80} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise ModelLoadError(file, f"tensor {name!r} has unknown dtype {dtype!r:.40}")
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise ModelLoadError(file, f"tensor {name!r} has invalid shape {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise ModelLoadError(file, f"tensor {name!r} has invalid data_offsets {offsets!r:.80}")
        begin, end = offsets
        if end > data_size:
            raise ModelLoadError(file, f"tensor {name!r} has data_offsets [{begin}, {end}] beyond the "
                                       f"{data_size} data bytes of the file")
        nbytes = DTYPE_SIZES[dtype]
        for dim in shape:
            nbytes *= dim
        if end - begin != nbytes:
            raise ModelLoadError(file, f"tensor {name!r}: {dtype} {shape} takes {nbytes} bytes, but its "
                                       f"data_offsets [{begin}, {end}] span {end - begin}")
        tensors[name] = (dtype, shape)
        if nbytes:
            spans.append((begin, end, name))
    spans.sort()
    for (_, previous_end, previous), (begin, _, name) in zip(spans, spans[1:]):
        if begin < previous_end:
            raise ModelLoadError(file, f"tensors {previous!r} (data bytes up to {previous_end}) and {name!r} "
                                       f"(from byte {begin}) overlap")
    return tensors


def _open(file: Path, framework: str = "pt"):
    try:
        return safe_open(str(file), framework=framework)
    except (SafetensorError, OSError) as exc:
        raise ModelLoadError(file, f"corrupt or truncated safetensors file ({exc})") from None


def _check_against_config(config: ModelConfig, layer_key: str, shapes: dict[str, list[int]], path: Path) -> None:
    """The layer count and the shapes the config gives the weights it sizes (found through the
    family's llama.cpp names for them), against the shards' tensors."""
    names = registry.family(config.architecture).gguf_tensor_names
    layer_re = re.compile(rf"^{re.escape(names.layer_prefix)}\.(\d{{1,18}})\.")
    layer_of = {name: int(match[1]) for name in shapes if (match := layer_re.match(name))}
    check_layers(path, layer_key, config.num_layers, layer_of, f"{names.layer_prefix}.{{}}.*")
    layer_kinds = {module: kind for kind, module in names.layer_names.items()}
    global_kinds = {module: kind for kind, module in names.global_names.items()}
    weights = []
    for name, shape in shapes.items():
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        match = layer_re.match(module)
        if match:
            kind = layer_kinds.get(module[match.end():])
            if config.conv1d_weights and len(shape) == 2:  # stored [in, out]
                shape = shape[::-1]
        else:
            kind = global_kinds.get(module)
        if kind is not None:
            weights.append((name, kind, shape))
    check_shapes(path, config, weights)


def load_hf_directory(directory: Path) -> Checkpoint:
    from lmserve.tokenizer import Tokenizer

    config_file = directory / "config.json"
    raw_config = _read_json(config_file)
    config = model_config_from_hf(raw_config, str(config_file))
    files = _shard_files(directory)
    types: Counter = Counter()
    shapes: dict[str, list[int]] = {}
    num_params = 0
    for file in files:
        for name, (dtype, shape) in read_header(file).items():
            types[dtype] += 1
            shapes[name] = shape
            count = 1
            for dim in shape:
                count *= dim
            num_params += count
        with _open(file, "numpy"):  # the safetensors library's own checks of the header ("pt" imports PyTorch)
            pass
    _check_against_config(config, "n_layer" if "n_layer" in raw_config else "num_hidden_layers", shapes,
                          directory)

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
