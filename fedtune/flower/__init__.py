"""Flower's side of fedtune: the ServerApp, the ClientApp and the one adapter from strategies to Flower.

Flower may import the ServerApp and ClientApp modules from two threads of one process at
once (``flwr run`` in simulation). First imports of torch, transformers and peft, whose
modules import one another, then race: Python's import machinery breaks the deadlock by
handing one thread a half-initialised module ("cannot import name 'MixedModel' from
partially initialized module 'peft.tuners'"). Both app modules live in this package, so this
file runs first, in one thread, under Python's import lock for the package, and loads the
whole stack before either app module goes on.

May import: the core modules and every other room: :mod:`fedtune.client`, :mod:`fedtune.server`,
:mod:`fedtune.averaging`, :mod:`fedtune.objectives`, :mod:`fedtune.evaluation`, :mod:`fedtune.data`,
:mod:`fedtune.models` and :mod:`fedtune.reporting` (it is the top of the import graph, under only
:mod:`fedtune.cli`). It is the only room that imports ``flwr``.
"""

import flwr.app  # noqa: F401

import fedtune.stack  # noqa: F401  (the libraries, in one thread: see fedtune.stack)
from fedtune.registry import import_all_methods

import_all_methods()  # every method, in this one thread, before either app module goes on
