"""The client side, without Flower: what one organisation runs on its own data.

:mod:`~fedtune.client.runtime` holds :class:`~fedtune.client.runtime.ClientRuntime` (the client's
data, model and settings, which a method's routine asks for), :mod:`~fedtune.client.training` the
local training loop (AdamW, or DP-SGD through :mod:`fedtune.privacy`) on an objective's loss
(:mod:`fedtune.objectives`), :mod:`~fedtune.client.state` a client's own state on its disk
between rounds, :mod:`~fedtune.client.ledger` its privacy ledger, and :mod:`~fedtune.client.attacks` the simulated
hostile clients for testing defences.

May import: the core modules (:mod:`fedtune.schema`, :mod:`fedtune.errors`,
:mod:`fedtune.protocol`, :mod:`fedtune.registry`, :mod:`fedtune.privacy`, :mod:`fedtune.strategy`,
:mod:`fedtune.routine`), :mod:`fedtune.data`, :mod:`fedtune.models`, :mod:`fedtune.objectives`,
:mod:`fedtune.evaluation`, :mod:`fedtune.averaging` and :mod:`fedtune.reporting`. Never
:mod:`fedtune.server` or :mod:`fedtune.flower`: the ClientApp (in :mod:`fedtune.flower`) calls in here, not the other way.
"""

import fedtune.stack  # noqa: F401  (loaded first, in one thread: see fedtune.stack)
