"""What a training step minimises and how a split is scored: the objectives (``train.objective``).

:mod:`~fedtune.objectives.objective` holds :class:`~fedtune.objectives.objective.Objective`
(SFT and classification: :class:`~fedtune.objectives.objective.Supervised`; DPO:
:class:`~fedtune.objectives.objective.DirectPreference`) and
:func:`~fedtune.objectives.objective.evaluate`; :mod:`~fedtune.objectives.dpo` the DPO terms. Both
sides use them: a client trains on an objective's loss, the server scores the global model with
the same objective, so they live in neither side's room.

May import: :mod:`fedtune.schema`, :mod:`fedtune.errors`, :mod:`fedtune.data` and
:mod:`fedtune.models`.
"""

from fedtune.objectives.objective import SUPERVISED, DirectPreference, Objective, Supervised, evaluate, objective_of

__all__ = ["SUPERVISED", "DirectPreference", "Objective", "Supervised", "evaluate", "objective_of"]
