"""The server side, without Flower: a run's set-up, its rounds' bookkeeping and its end.

:mod:`~fedtune.server.run` holds :class:`~fedtune.server.run.ServerRun` (the base model and the
global adapter, the central evaluation, the run directory, trackers and checkpoints, the final
adapter), :mod:`~fedtune.server.checkpoint` the checkpoint written after every round (loaded
safely) and what a resumed run may change, :mod:`~fedtune.server.interrupt` Ctrl-C and SIGTERM.
How client tensors become the global ones is :mod:`fedtune.averaging` and each method's
:class:`~fedtune.strategy.Strategy`.

May import: the core modules, :mod:`fedtune.data`, :mod:`fedtune.models`,
:mod:`fedtune.objectives`, :mod:`fedtune.evaluation`, :mod:`fedtune.averaging` and
:mod:`fedtune.reporting`. Never :mod:`fedtune.client` or :mod:`fedtune.flower`: the ServerApp (in
:mod:`fedtune.flower`) drives a :class:`~fedtune.server.run.ServerRun`, not the other way.
"""

import fedtune.stack  # noqa: F401  (loaded first, in one thread: see fedtune.stack)
