"""Load a Hugging Face checkpoint folder (config.json + *.safetensors) onto one device.

The model is built on the meta device, its parameters are allocated once on the target device
in the target dtype, and the checkpoint's tensors are streamed into them one at a time from
the memory-mapped safetensors files, so a large model never has a full copy in host memory.
A rank of a tensor-parallel group builds its share of the model (distributed/tensor_parallel.py) and
reads only its slices of each tensor.
With load_format `dummy` no weight file is read: the parameters are filled in place on the
device with seeded random values instead (`randomize`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..config import LOAD_FORMATS
from ..distributed import tensor_parallel
from ..distributed.tensor_parallel import WHOLE, Split
from ..layers.rotary import RotaryEmbedding
from . import ModelConfig, model_class

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str | None) -> str:
    """A local checkpoint folder; None means the embedded SmolLM2 model."""
    if model is None:
        from .embedded import embedded_model_path

        return str(embedded_model_path())
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ValueError(f"model {model!r} is not a folder; tr_engine loads local Hugging Face "
                         "checkpoints (config.json + *.safetensors)")
    return str(path)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig) -> torch.dtype:
    """`auto` -> the checkpoint's dtype; a name (float32, bfloat16, float16) or torch dtype
    -> itself."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported; use one of {', '.join(_DTYPES)}")
        return dtype
    name = config.dtype if dtype == "auto" else dtype
    if name not in _DTYPES:
        raise ValueError(f"dtype must be auto or one of {', '.join(_DTYPES)}; got {dtype!r}")
    return _DTYPES[name]


def safetensors_files(path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files: those model.safetensors.index.json names, else
    model.safetensors, else every *.safetensors file."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{path}: the safetensors index names files that are "
                                    f"not there: {', '.join(absent)}")
        return files
    if (path / "model.safetensors").is_file():  # not other formats' files beside it
        return [path / "model.safetensors"]
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
        raise FileNotFoundError(
            f"{path} holds PyTorch pickle weights (.bin/.pt) only; safetensors is required "
            "(pickles can run code when loaded). Convert once, e.g. with transformers: "
            "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path)"
        )
    raise FileNotFoundError(f"{path} has no weight files: neither model.safetensors nor "
                            "*.safetensors shards (with model.safetensors.index.json) are "
                            "there; load_format dummy serves random weights without them")


def read_config(path: str | Path) -> ModelConfig:
    """The checkpoint folder's model config."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    return ModelConfig.from_dir(path)


def load_model(path: str | Path, device: torch.device, dtype: str | torch.dtype = "auto",
               max_positions: int | None = None, load_format: str = "auto", seed: int = 0,
               split: Split = WHOLE) -> tuple[nn.Module, ModelConfig]:
    """Build the checkpoint's model on `device` in `dtype` and load its weights.

    max_positions: length of the RoPE table (default: the model's max_position_embeddings);
    positions at or beyond it cannot be embedded.
    load_format: `auto` reads the safetensors weights; `dummy` reads only config.json and
    gives the parameters random values drawn from `seed` (`randomize`).
    split: this rank's part of a tensor-parallel group; the config returned is the whole
    model's either way.
    """
    path, device = Path(path), torch.device(device)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}; got "
                         f"{load_format!r}")
    config = read_config(path)
    files = safetensors_files(path) if load_format == "auto" else []
    cls = model_class(config)
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = cls(tensor_parallel.shard_config(config, split.size))
        tensor_parallel.parallelize(model, config, split)
    _materialize(model, device, dtype)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build_cache(device, max_positions)
    if load_format == "dummy":
        randomize(model, seed, split)
        return model.eval(), config

    def part(name: str, shape: tuple[int, ...]):
        return tensor_parallel.slice_of(name, shape, config, split.size, split.rank)

    try:
        model.load_weights(_tensors(files, device, part))
    except ValueError as e:
        raise type(e)(f"{path}: {e}") from None
    return model.eval(), config


def randomize(model: nn.Module, seed: int, split: Split = WHOLE) -> None:
    """Fill every parameter in place, on its device and in its dtype, with random values
    whose scales keep activations finite through any depth: norm scales near 1, small
    biases, and every matrix (embedding included) of std 1/sqrt(its columns). Each layer then
    adds about unit variance to the residual stream, and logits have about unit spread, tied
    head or not (an embedding of unit variance as the head would make them sqrt(hidden) wide
    and the model repeat its input).

    Each parameter draws from its own generator, seeded by `seed` and the parameter's name,
    so its values depend neither on the number of ranks nor on which other parameters a
    rank holds: every rank of one device type makes the same model. A tensor-parallel
    rank's split parameters draw from their own generators (seeded by its index as well),
    with the scales of the whole model.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied parameters are listed once
            split_here = split.size > 1 and tensor_parallel.is_split(name)
            key = f"{name}/tp{split.rank}of{split.size}" if split_here else name
            gen = torch.Generator(device=param.device)
            gen.manual_seed(_param_seed(seed, key))
            if param.dim() == 1:  # RMSNorm scales (`*.weight`) and biases
                mean, std = (1.0, 0.1) if name.endswith("weight") else (0.0, 0.1)
            else:  # [out, in] projections; the embedding too, as it may be the lm_head
                fan_in = param.shape[1] * (split.size if split_here and
                                           name.split(".")[-2] in tensor_parallel.ROW else 1)
                mean, std = 0.0, 1.0 / math.sqrt(fan_in)
            param.normal_(mean, std, generator=gen)


def _param_seed(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # below 2**63: any generator takes it


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter uninitialised storage on `device`, keeping tied parameters
    tied (nn.Module.to_empty would split them). The loader fills them all."""
    new: dict[nn.Parameter, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param not in new:
                data = torch.empty(param.shape, device=device, dtype=dtype)
                new[param] = nn.Parameter(data, requires_grad=False)
            setattr(module, name, new[param])


def _tensors(files: list[Path], device: torch.device, part
             ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every file, read straight onto `device` where safetensors can.
    `part(name, shape)` names the slice to read (tensor_parallel.slice_of), None all."""
    for file in files:
        try:
            handle = safe_open(file, framework="pt", device=str(device))
        except Exception:  # a device safetensors does not know: read to host, copy per tensor
            handle = safe_open(file, framework="pt", device="cpu")
        with handle as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                view = f.get_slice(name)
                cut = part(name, tuple(view.get_shape()))
                if cut is None:
                    yield name, f.get_tensor(name)
                    continue
                dim, start, stop, length = cut
                index = (slice(None),) * dim + (slice(start, stop),)
                tensor = view[index]
                if stop - start < length:  # the padding of a vocabulary split unevenly
                    pad = [0, 0] * (tensor.dim() - 1 - dim) + [0, length - (stop - start)]
                    tensor = F.pad(tensor, pad)
                yield name, tensor
