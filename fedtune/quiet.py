"""Keep the terminal readable: silence progress bars and notices that say nothing to a user."""

from __future__ import annotations

import logging
import os
import warnings


def quiet_libraries() -> None:
    """Hide datasets' progress bars, transformers' load reports and two known-harmless notices."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # bitsandbytes (imported by peft) looks for an optional kernels package for 4-bit CPU speed.
    warnings.filterwarnings("ignore", message=".*gemm_4bit_forward.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*", category=DeprecationWarning)
