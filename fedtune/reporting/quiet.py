"""Keep the terminal readable: silence progress bars and notices that say nothing to a user.

Third-party notices are silenced one by one, by their exact message, and only where the
cause is not fedtune's; where it is ours, the call that caused it is fixed instead.
"""

from __future__ import annotations

import logging
import os
import warnings

# bitsandbytes (imported by peft) looks for an optional `kernels` package for 4-bit speed on
# CPUs with AVX512-BF16, and logs this when it is absent: it still runs without it.
_BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"
# dp_accounting's RDP accountant (privacy.accountant=rdp) logs each Rényi order whose series
# does not converge in 1,000 terms (small σ with a large q, orders near 1) and leaves it out:
# ε from the other orders is still a valid bound. A σ search can log it dozens of times.
_RDP_ORDER_NOTICE = "_compute_log_a_frac failed to converge"


class _DropMessage(logging.Filter):
    """Drop log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_notices() -> None:
    """Filter the known-harmless notices; imports nothing heavy, so call it first thing."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ray warns, on every start without GPUs, that a future version stops overriding
    # CUDA_VISIBLE_DEVICES for zero-GPU workers; this opts in to that behaviour now.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")  # before bitsandbytes is imported
    if not any(isinstance(f, _DropMessage) for f in bnb.filters):
        bnb.addFilter(_DropMessage(_BNB_KERNELS_NOTICE))
    absl = logging.getLogger("absl")  # dp_accounting logs through absl's logger
    if not any(isinstance(f, _DropMessage) for f in absl.filters):
        absl.addFilter(_DropMessage(_RDP_ORDER_NOTICE))
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)


def quiet_libraries() -> None:
    """:func:`quiet_notices`, and hide datasets' progress bars and transformers' load reports."""
    quiet_notices()
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
