"""Quantized base models for clients short of memory: bitsandbytes 8-bit and 4-bit (NF4/FP4).

The base weights of every linear layer except the task head are stored in 8 bits
(LLM.int8, row-wise scales) or 4 bits (blocks of 64 with an absmax each, optionally itself
quantized: "double quantization"); LoRA adapters, the head, embeddings and norms stay in
full precision, and training follows PEFT's k-bit preparation
(:func:`peft.prepare_model_for_kbit_training`). bitsandbytes' CPU backend runs all of it.

Three things this module takes care of beyond passing a ``BitsAndBytesConfig``:

* **Pre-quantized checkpoints.** Quantizing while loading reads every full-precision weight,
  so the loading process briefly holds (and keeps mapped) the whole full-precision file. The
  first load on a machine therefore writes the quantized model to the fedtune cache
  (``$FEDTUNE_CACHE/quantized/<key>``) and every load, that one included, reads it from
  there: a process then maps only the quantized bytes. A reload is bitwise identical to
  quantizing afresh (``tests/test_quantization.py``).
* **The head stays trainable.** bitsandbytes would quantize the classification head too;
  it is skipped (:data:`HEAD_MODULES`), so PEFT can train and exchange it as with any base.
* **Training after evaluation.** On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a
  4-bit weight into an inference-only layout on its first forward pass without gradients;
  after that the layer no longer back-propagates (with a bias it raises, without one the
  gradient through the base weight is silently lost). Clients evaluate and then train again,
  so the repacking is switched off (:func:`keep_trainable_layout`).
"""

from __future__ import annotations

import hashlib
import json
import resource
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from fedtune.errors import ModelLoadError
from fedtune.models.cache import cache_dir
from fedtune.schema import ModelConfig

# Task heads: kept in full precision, trained and exchanged like any adapter tensor (PEFT's
# modules_to_save for sequence classification), or tied to the embeddings (lm_head).
HEAD_MODULES = ["classifier", "score", "lm_head"]
CACHE_SUBDIR = "quantized"


def bnb_config(cfg: ModelConfig) -> Any:
    """The ``transformers.BitsAndBytesConfig`` for ``cfg.quantization`` (None when ``none``)."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(HEAD_MODULES))
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                              bnb_4bit_use_double_quant=cfg.double_quant,
                              bnb_4bit_compute_dtype=getattr(torch, cfg.compute_dtype),
                              llm_int8_skip_modules=list(HEAD_MODULES))


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))


def bits_of(cfg: ModelConfig) -> int:
    """Bits per base weight: 4, 8, or those of ``cfg.dtype``."""
    if cfg.quantization != "none":
        return int(cfg.quantization.removesuffix("bit"))
    return torch.finfo(getattr(torch, cfg.dtype)).bits


# --------------------------------------------------------------------------- loading


def _source_fingerprint(path: str) -> list[Any]:
    """Names, sizes and modification times of a local model's files (a hub id: the id alone)."""
    folder = Path(path)
    if not folder.is_dir():
        return [path]
    return sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in folder.iterdir()
                  if f.is_file() and f.suffix in (".safetensors", ".bin", ".json"))


def checkpoint_folder(cfg: ModelConfig, path: str, num_labels: int | None, seed: int) -> Path:
    """Where the pre-quantized copy of this model, head and quantization lives in the cache.

    The key covers everything that changes the saved tensors: the source files, the task and
    its number of labels, the seed (a fresh head is initialised under it) and the settings.
    """
    import bitsandbytes
    import transformers

    key = {"source": str(Path(path).resolve()) if Path(path).is_dir() else path,
           "files": _source_fingerprint(path), "task": cfg.task, "num_labels": num_labels, "seed": seed,
           "dtype": cfg.dtype, "quantization": cfg.quantization, "quant_type": cfg.quant_type,
           "double_quant": cfg.double_quant, "compute_dtype": cfg.compute_dtype,
           "versions": [transformers.__version__, bitsandbytes.__version__]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = f"{Path(path).name or 'model'}-{cfg.quantization}-{digest}"
    return cache_dir() / CACHE_SUBDIR / name


def load_quantized(cfg: ModelConfig, path: str, num_labels: int | None, seed: int,
                   from_pretrained: Callable[..., torch.nn.Module],
                   device: torch.device | None = None) -> torch.nn.Module:
    """The quantized model on ``device`` (the CPU by default), read from its pre-quantized copy.

    ``from_pretrained(path, **kwargs)`` loads a model for ``cfg.task`` (with the head, dtype
    and error handling of :func:`fedtune.models.loading.load_base_model`). The copy is written on
    first use, quantized on the CPU, so every device loads the same quantized weights.
    """
    folder = checkpoint_folder(cfg, path, num_labels, seed)
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)  # a fresh head is initialised here
        model = from_pretrained(path, quantization_config=bnb_config(cfg), device_map="cpu")
        _save_atomically(model, folder)
        del model  # releases the mapping of the full-precision file
    target = "cpu" if device is None or device.type == "cpu" else {"": str(device)}
    model = from_pretrained(str(folder), device_map=target)
    if not is_quantized(model):
        raise ModelLoadError(f"the cached checkpoint {folder} is not quantized; delete it and retry")
    keep_trainable_layout(model)
    return model


def _save_atomically(model: torch.nn.Module, folder: Path) -> None:
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=folder.parent))
        model.save_pretrained(staging)
    except OSError as e:
        raise ModelLoadError(f"cannot write the pre-quantized model to {folder.parent} ({e}); point "
                             "FEDTUNE_CACHE at a writable folder") from e
    try:
        staging.rename(folder)
    except OSError:  # another process finished first: its copy is identical
        shutil.rmtree(staging, ignore_errors=True)


def keep_trainable_layout(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference (see the module doc)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: torch.nn.Module, cfg: ModelConfig) -> torch.nn.Module:
    """PEFT's k-bit preparation on a quantized base; gradient checkpointing when configured.

    The preparation freezes the base and keeps non-quantized weights (norms, embeddings, head)
    in float32. Gradient checkpointing uses the non-reentrant variant, which needs no
    gradient on the inputs.
    """
    kwargs = {"use_reentrant": False}
    if is_quantized(model):
        from peft import prepare_model_for_kbit_training

        return prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                               gradient_checkpointing_kwargs=kwargs)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


# --------------------------------------------------------------------------- measuring


def _storages(model: torch.nn.Module, skip: Callable[[str], bool]) -> Iterator[torch.Tensor]:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if skip(name):
            continue
        yield tensor
        quant_state = getattr(tensor, "quant_state", None)  # 4-bit: absmax (maybe quantized itself), code
        while quant_state is not None:
            yield from (t for t in (quant_state.absmax, quant_state.code, quant_state.offset)
                        if isinstance(t, torch.Tensor))
            quant_state = quant_state.state2
        scales = getattr(tensor, "SCB", None)  # 8-bit: one scale per row
        if isinstance(scales, torch.Tensor):
            yield scales


def is_adapter_tensor(name: str) -> bool:
    """Whether a parameter name belongs to a PEFT adapter rather than to the base model."""
    return ".lora_" in name or ".modules_to_save." in name


def weight_bytes(model: torch.nn.Module, skip: Callable[[str], bool] = is_adapter_tensor) -> int:
    """Bytes held by the model's weights: every parameter and buffer storage, once.

    Quantized weights count their packed storage plus their quantization state (4-bit
    absmax and code tables, 8-bit row scales); tied weights count once. Adapter tensors
    are left out by default, so this is the memory of the base.
    """
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in _storages(model, skip):
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def peak_rss_bytes() -> int:
    """The peak resident memory of this process so far (``getrusage``'s ``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux


__all__ = [
    "HEAD_MODULES",
    "bits_of",
    "bnb_config",
    "checkpoint_folder",
    "is_adapter_tensor",
    "is_quantized",
    "keep_trainable_layout",
    "load_quantized",
    "peak_rss_bytes",
    "prepare_for_training",
    "weight_bytes",
]
