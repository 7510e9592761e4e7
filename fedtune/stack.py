"""Loads the run-time libraries once, in one thread: torch, transformers, peft and datasets.

Flower may import the ServerApp and ClientApp modules from two threads of one process at once,
and first imports of torch, transformers and peft, whose modules import one another, then race:
Python's import machinery breaks the deadlock by handing one thread a half-initialised module
("cannot import name 'MixedModel' from partially initialized module 'peft.tuners'"). Every room
that runs a round (:mod:`fedtune.flower`, :mod:`fedtune.client`, :mod:`fedtune.server`) imports this
module first, so the first thread to get here loads the libraries under this module's import lock
and the others wait for it.

The methods are not loaded here but by :mod:`fedtune.flower`, the top of the import graph:
a method imports :mod:`fedtune.routine`, which imports :mod:`fedtune.client`, which imports this
module, so loading the methods here would close an import circle whenever a method module is
the first one imported (``from fedtune.strategies import FLoRA``). fedtune's own modules form no
circle (tests/test_architecture.py), and per-module import locks cannot deadlock without one.
"""

from fedtune.reporting.quiet import quiet_libraries

quiet_libraries()  # its filters must be in place before bitsandbytes (via peft) is imported

import datasets  # noqa: E402, F401
import peft  # noqa: E402, F401
import torch  # noqa: E402, F401
import transformers  # noqa: E402, F401

# transformers resolves these lazily on first use; resolve them here, in one thread.
from transformers import (  # noqa: E402, F401
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)
