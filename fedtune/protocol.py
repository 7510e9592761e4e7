"""The wire format's names: the records and keys that travel between server and clients, in one place.

With :func:`tensor_digest` (how a client proves it holds the server's frozen tensors). How
tensors become Flower records is :mod:`fedtune.flower.codec`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys, server -> client
SERVER_ROUND = "server-round"
ROUTINE = "fedtune.routine"  # the client routine to run (fedtune.routine)
DEFAULT_ROUTINE = "gradient"  # the routine an instruction names unless it says otherwise (GradientRoutine)
# The run's id, the same across resumes: clients keep their own state under it (fedtune.client.state).
RUN_KEY = "fedtune.run-key"
TRAINABLE = "fedtune.trainable"  # newline-separated regular expressions
# Where the client counts its local training steps for the server's progress display
# (simulation only: a file on the shared disk; fedtune.reporting.progress).
STEP_FILE = "fedtune.step-file"
# False when the strategy cannot train on a quantized base: a quantized client refuses the round.
QUANTIZED_BASE_OK = "fedtune.quantized-base-ok"
STRATEGY_PREFIX = "strategy."  # strategy-specific settings are sent under this prefix
# Under STRATEGY_PREFIX: a client checks that its frozen tensors (names matching the
# pattern) hash to the digest, i.e. that it holds exactly the server's frozen tensors.
FROZEN_PATTERN = "frozen_pattern"
FROZEN_DIGEST = "frozen_digest"

# MetricRecord keys, client -> server
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
TRAIN_STEPS = "train_steps"
TRAIN_SECONDS = "train_seconds"
MODEL_LOAD_SECONDS = "model_load_seconds"
EVAL_LOSS = "eval_loss"
EVAL_ACCURACY = "eval_accuracy"
# A generative eval.metric's score on the client's eval split (eval.clients), and its examples.
EVAL_GENERATIVE = "eval_generative"
EVAL_GENERATIVE_EXAMPLES = "eval_generative_examples"
LORA_RANK = "lora_rank"
LORA_SCALING = "lora_scaling"  # alpha / rank of the client's adapter
DP_EPSILON = "dp_epsilon"  # ε spent so far by the client (privacy.enabled)
DP_NOISE_MULTIPLIER = "dp_noise_multiplier"
BASE_BITS = "base_bits"  # bits per base weight: 4, 8, 16 or 32
BASE_WEIGHT_BYTES = "base_weight_bytes"  # memory held by the client's base weights
PEAK_RSS_BYTES = "peak_rss_bytes"  # peak resident memory of the client's process so far
PEAK_GPU_BYTES = "peak_gpu_bytes"  # peak GPU memory torch allocated on the client's device so far (GPU clients)

# node_config keys (simulation sets the first two)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"

# Adapter tensors travel under PEFT's state-dict names: X.lora_A.weight (r×n), X.lora_B.weight (m×r).
LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"


def lora_modules(keys: Iterable[str]) -> list[str]:
    """Modules ``X`` with both ``X.lora_A.weight`` and ``X.lora_B.weight`` among ``keys``, sorted."""
    present = set(keys)
    return sorted(k[:-len(LORA_A)] for k in present if k.endswith(LORA_A) and k[:-len(LORA_A)] + LORA_B in present)


def unpaired_lora_modules(keys: Iterable[str]) -> list[str]:
    """Modules with one LoRA factor among ``keys`` and not the other, sorted."""
    present = set(keys)
    a = {k[:-len(LORA_A)] for k in present if k.endswith(LORA_A)}
    b = {k[:-len(LORA_B)] for k in present if k.endswith(LORA_B)}
    return sorted(a ^ b)


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in name order: equal iff bitwise equal."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
