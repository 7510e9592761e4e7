"""FedKSeed and FedKSeed-Pro: zeroth-order federated tuning that ships seeds and scalars only.

Qin et al., "Federated Full-Parameter Tuning of Billion-Sized Language Models with
Communication Cost under 18 Kilobytes", ICML 2024 (https://arxiv.org/abs/2312.06353).

Each client runs τ zeroth-order steps (:func:`fedtune.strategies.fedkseed.zeroth_order.zo_train`), each along
the direction of a seed drawn from a pool of K seeds fixed by the run seed, and replies
with its ``(seed, scalar)`` list. The server sums each client's scalars per seed, averages
those sums across clients weighted by examples, and appends the round's ``(round, seed,
scalar)`` entries to the global history. The global model is the initial adapter plus the
replay of that history (``w <- w - η g z(s)``), which the server keeps as fp32 masters and
which every client rebuilds bit for bit from the entries it has not seen yet.

FedKSeed-Pro samples seeds non-uniformly: a seed's importance is the mean clipped
magnitude of the scalars clients reported for it, min-max normalised and turned into
probabilities with a softmax (the paper's scheme; the clipping, the mean and the min-max +
softmax are computed as in the public implementations). The normalised importance travels as
one byte a seed (4 KB at K = 4096, against 32 KB as float64 probabilities), which moves each
probability by at most 0.2 %; the server reports the probabilities clients compute from it.

No message carries a tensor. The payloads are plain Python values: :meth:`FedKSeed.round_plan`
(settings, :meth:`FedKSeed.catch_up`, :meth:`FedKSeed.importance`) encoded by
:func:`fedtune.strategies.fedkseed.wire.encode_round_config`, and the client's steps encoded by
:func:`fedtune.strategies.fedkseed.wire.encode_steps`; see :meth:`FedKSeed.configure_client` for what
the Flower glue must do with them.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from fedtune.strategies.aggregation import check_weighting, normalized_weights
from fedtune.strategies.fedkseed.wire import (
    ZEROTH_ORDER_ROUTINE,
    CatchUp,
    HistoryEntry,
    RoundPlan,
    decode_history,
    decode_steps,
    encode_history,
    encode_round_config,
)
from fedtune.strategies.fedkseed.zeroth_order import (
    DEFAULT_TRAINABLE,
    TUNE_ADAPTER,
    TUNE_FULL,
    Step,
    direction_fingerprint,
    group_history,
    importance_levels,
    probabilities_from_levels,
    replay,
    seed_pool,
    tunable_tensors,
)

from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    select,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientSteps:
    """One client's reply in a round, decoded: what :meth:`FedKSeed.aggregate_steps` takes."""

    node_id: int
    num_examples: int
    history: Sequence[Step]
    state_round: int


@register_strategy
class FedKSeed(Strategy):
    """Zeroth-order federated tuning over a pool of K seeds (Qin et al., ICML 2024).

    Parameters
    ----------
    k : int
        Size of the seed pool (the paper: 4096).
    eps : float
        Perturbation scale ε of the two-point estimate (the paper: 5e-4).
    lr : float
        Learning rate η of every update, local and global. The default 3e-7 is the
        reference scripts' value for full-parameter tuning of a 1B model; adapters need
        a larger one.
    steps : int
        Zeroth-order steps per client per round (τ).
    pro : bool
        FedKSeed-Pro: sample seeds by importance instead of uniformly.
    importance_clip : float
        Pro only: each scalar's magnitude is clipped to this before averaging, so one loss
        spike does not decide a seed's importance.
    weighting : {"examples", "uniform"}
        Weight each client's per-seed sums by its number of examples (the paper) or equally.
    tune : {"full", "adapter"}
        ``full`` (the paper's setting): the model's own weights and the task head, in
        float32 masters; the run exports a whole model. ``adapter``: the LoRA adapter's
        tensors only, which also works on a quantized base.
    trainable : sequence of str, optional
        Regular expressions over the tensor names ``tune`` offers: the tensors tuned. By
        default every one for ``full``, and for ``adapter`` all but the LoRA A factors
        (``DEFAULT_TRAINABLE``): while B is zero the loss does not depend on A at all, so
        perturbing A adds only noise to every estimate. On SmolLM2-135M with B and A tuned,
        300 steps at η = 3e-3 diverged (eval loss 1.23 → 20.7); with B alone they took it to
        1.16 and ROUGE-L from 0.389 to 0.466 (FFA-LoRA freezes A for a related reason).
    """

    name = "fedkseed"
    supports_privacy = False
    summary_line = "zeroth-order tuning over K shared seeds, scalars only on the wire (Qin et al. 2024)"
    averaging_reason = "its clients send one scalar per seed and step, not tensors to average"

    def __init__(self, *, k: int = 4096, eps: float = 5e-4, lr: float = 3e-7, steps: int = 200,
                 pro: bool = False, importance_clip: float = 1000.0, weighting: str = "examples",
                 tune: str = TUNE_FULL, trainable: Sequence[str] | None = None) -> None:
        if tune not in (TUNE_FULL, TUNE_ADAPTER):
            raise ValueError(f"tune={tune!r} must be {TUNE_FULL!r} (the model's weights, the paper's setting) or "
                             f"{TUNE_ADAPTER!r} (the LoRA adapter only, e.g. on a quantized base)")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k={k!r} must be a positive integer (the paper uses 4096)")
        for what, value in (("eps", eps), ("lr", lr), ("importance_clip", importance_clip)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{what}={value!r} must be a positive finite number")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps={steps!r} must be a positive integer (local steps per round, τ)")
        if trainable is None:
            trainable = DEFAULT_TRAINABLE[tune]
        if isinstance(trainable, str) or not trainable:
            raise ValueError(f"trainable={trainable!r} must be a non-empty list of regular expressions")
        self.k, self.eps, self.lr, self.steps = k, float(eps), float(lr), steps
        self.pro, self.importance_clip = bool(pro), float(importance_clip)
        self.weighting = check_weighting(weighting)
        self.trainable = tuple(trainable)
        self.tune = tune
        self.tunes_base_model = tune == TUNE_FULL
        if self.tunes_base_model:
            self.supports_quantized_base = False
            self.quantized_base_reason = ("tune=full perturbs the base weights in float32, which a quantized base "
                                          "does not hold; use strategy.options.tune=adapter")
        self.history: list[HistoryEntry] = []
        self.last_seen: dict[int, int] = {}
        self._history_rounds: list[int] = []
        self._initial: Tensors = {}
        self._masters: Tensors = {}

    def config_problems(self, cfg: Any) -> list[str]:
        """``tune=full`` cannot train DPO: the perturbed weights are the reference's own."""
        if cfg.train.objective == "dpo" and self.tune == TUNE_FULL:
            return [("train.objective=dpo with strategy.options.tune=full: DPO's reference is the base model with "
                     "the adapter switched off, and full-parameter steps move that base; use "
                     "strategy.options.tune=adapter (the two-point estimate then applies to the DPO loss as to any)")]
        return []

    # ------------------------------------------------------------------ set-up

    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        self._initial = {name: t.detach().clone() for name, t in spec.initial.items()}
        candidates = tunable_tensors(self._initial, spec.base, self.tune)
        tuned = select(candidates, self.trainable)
        if not tuned:
            raise ValueError(f"trainable={list(self.trainable)} matches no tensor that tune={self.tune!r} offers "
                             f"(they are e.g. {sorted(candidates)[:2]})")
        self._masters = {name: t.to(torch.float32).clone() for name, t in sorted(tuned.items())}
        # The pretrained base is in the masters now; holding it again would copy it into every checkpoint.
        self.spec = dataclasses.replace(spec, base={})
        self.pool = seed_pool(spec.seed, self.k)
        self._pool_index = {seed: i for i, seed in enumerate(self.pool)}
        self._magnitude_sums = np.zeros(self.k, dtype=np.float64)
        self._magnitude_counts = np.zeros(self.k, dtype=np.int64)

    # ------------------------------------------------------------------ server -> client

    def catch_up(self, node_id: int, server_round: int) -> CatchUp:
        """The history entries ``node_id`` lacks before training in ``server_round``.

        A client's state is the global state of the last round it trained from (0, the
        initial adapter, for a client not seen yet); the entries after it bring the client
        to the state of round ``server_round - 1``.
        """
        # From the least up-to-date known client: a process may serve several clients
        # (simulation) and skips the entries it has already replayed.
        base = min([self.last_seen.get(node_id, 0), *self.last_seen.values()])
        through = max(base, server_round - 1)
        start = bisect.bisect_right(self._history_rounds, base)
        stop = bisect.bisect_right(self._history_rounds, through)
        return CatchUp(base_round=base, through_round=through, entries=tuple(self.history[start:stop]))

    def importance(self) -> bytes | None:
        """FedKSeed-Pro's seed importance as the wire carries it (one level 0..255 a pool seed); None: uniform."""
        if not self.pro or not self._magnitude_counts.any():
            return None
        # Public implementations start each seed's list with 0.0: one more term in the mean,
        # which shrinks seeds seen only once or twice towards "unimportant".
        return importance_levels(self._magnitude_sums / (self._magnitude_counts + 1))

    def sampling_probabilities(self) -> list[float] | None:
        """FedKSeed-Pro's probability per pool seed (pool order), as clients compute it; None means uniform."""
        levels = self.importance()
        return None if levels is None else probabilities_from_levels(levels)

    def probability_spread(self) -> float:
        """Max over min sampling probability: 1.0 when uniform, at most e with min-max + softmax."""
        probabilities = self.sampling_probabilities()
        return 1.0 if probabilities is None else max(probabilities) / min(probabilities)

    def round_plan(self, node_id: int, server_round: int, *, sampling: bool = True) -> RoundPlan:
        """Everything ``node_id`` needs in ``server_round``; encode it with ``encode_round_config``.

        ``sampling=False`` (an evaluation) leaves out FedKSeed-Pro's importance: nothing is sampled.
        """
        return RoundPlan(run_seed=int(self.spec.seed), k=self.k, eps=self.eps, lr=self.lr, steps=self.steps,
                         fingerprint=direction_fingerprint(), importance=self.importance() if sampling else None,
                         catch_up=self.catch_up(node_id, server_round), tune=self.tune)

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        """No tensors: the catch-up history, the importance levels and the settings, in ``config``.

        ``config`` holds lists (``ConfigRecord`` accepts them, and the current server glue
        passes ``config`` through unchanged), though ``ClientInstruction.options`` is typed
        as scalars only. ``expects`` is empty: the reply's payload is in its metrics, which
        :meth:`aggregate` reads (see :func:`fedtune.strategies.fedkseed.wire.encode_steps`).
        """
        return ClientInstruction(arrays={}, trainable=self.trainable, expects={}, routine=ZEROTH_ORDER_ROUTINE,
                                 options=encode_round_config(self.round_plan(node_id, server_round)))

    def configure_evaluation(self, server_round: int, node_id: int) -> ClientInstruction:
        """Evaluation needs no tensors either: the client replays the history it lacks."""
        return ClientInstruction(arrays={}, trainable=self.trainable, expects={}, routine=ZEROTH_ORDER_ROUTINE,
                                 options=encode_round_config(self.round_plan(node_id, server_round + 1, sampling=False)))

    # ------------------------------------------------------------------ client -> server

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """Decode each reply's steps from its metrics, then :meth:`aggregate_steps`.

        A reply whose steps are missing or malformed, use seeds outside the pool, or were
        trained from another state than round ``server_round - 1`` is left out and counted
        in ``fedkseed_replies_rejected``.
        """
        replies, rejected, skipped = [], 0, 0
        for update in updates:
            try:
                history, state_round, skipped_steps = decode_steps(update.metrics)
                self._check_reply(server_round, history, state_round)
            except ValueError as e:
                rejected += 1
                log.warning("round %d: FedKSeed left out client %d's reply: %s", server_round, update.node_id, e)
                continue
            skipped += skipped_steps
            replies.append(ClientSteps(update.node_id, update.num_examples, history, state_round))
        metrics = self.aggregate_steps(server_round, replies)
        return {**metrics, "fedkseed_replies_rejected": float(rejected), "fedkseed_skipped_steps": float(skipped)}

    def aggregate_steps(self, server_round: int, replies: Sequence[ClientSteps]) -> dict[str, float]:
        """Fold the round's decoded replies into the global history and model.

        For each seed j: ``G_j = Σ_i p_i Σ_{t: s_t = j} g_{i,t}`` with ``p`` the normalised
        weights, every sum ``math.fsum`` in float64 (exactly rounded, so independent of the
        order replies arrive in). The round's entries are appended in pool order, zeros
        dropped, and replayed onto the server's fp32 masters.
        """
        replies = sorted(replies, key=lambda r: r.node_id)
        weights = [r.num_examples if self.weighting == "examples" else 1.0 for r in replies]
        if not replies or sum(weights) <= 0:
            return {"fedkseed_entries": 0.0, "fedkseed_history_length": float(len(self.history))}
        probabilities = normalized_weights(weights)
        terms: dict[int, list[float]] = {}
        for p, reply in zip(probabilities, replies):
            for seed, per_client_sum in group_history(reply.history):
                terms.setdefault(seed, []).append(p * per_client_sum)
            self._record_magnitudes(reply.history)
            self.last_seen[reply.node_id] = reply.state_round
        round_entries = [HistoryEntry(server_round, seed, math.fsum(terms[seed]))
                         for seed in sorted(terms, key=self._pool_index.__getitem__)]
        round_entries = [e for e in round_entries if e.scalar != 0.0]
        self.history.extend(round_entries)
        self._history_rounds.extend(e.round for e in round_entries)
        replay(self._masters, [(e.seed, e.scalar) for e in round_entries], self.lr)
        metrics = {"fedkseed_entries": float(len(round_entries)), "fedkseed_history_length": float(len(self.history))}
        if self.pro:
            metrics["fedkseed_probability_spread"] = self.probability_spread()
        return metrics

    def _check_reply(self, server_round: int, history: Sequence[Step], state_round: int) -> None:
        if state_round != server_round - 1:
            raise ValueError(f"it trained from round {state_round}'s state, expected round {server_round - 1}; "
                             "the client must apply the catch-up before training")
        if len(history) > self.steps:
            raise ValueError(f"it reports {len(history)} steps, more than steps={self.steps}")
        foreign = [seed for seed, _ in history if seed not in self._pool_index]
        if foreign:
            raise ValueError(f"seed {foreign[0]} is not in the pool (k={self.k}, run seed {self.spec.seed}); "
                             "the client must draw from seed_pool(run_seed, k)")

    def _record_magnitudes(self, history: Sequence[Step]) -> None:
        for seed, scalar in history:
            index = self._pool_index[seed]
            self._magnitude_sums[index] += min(abs(scalar), self.importance_clip)
            self._magnitude_counts[index] += 1

    # ------------------------------------------------------------------ the global model

    def global_adapter(self) -> Tensors:
        """The initial adapter with the tuned tensors replaced by the replayed masters.

        With ``tune="full"`` the masters of the base weights are included, under their
        base names (:meth:`fedtune.models.loading.AdapterHandle.load` accepts them).
        """
        result = {name: t.clone() for name, t in self._initial.items()}
        for name, master in self._masters.items():
            result[name] = master.to(self._initial[name].dtype) if name in self._initial else master.clone()
        return result

    def state_dict(self) -> dict[str, Any]:
        """The attributes, the history as plain ``(round, seed, scalar)`` tuples (what a safe checkpoint holds)."""
        state = super().state_dict()
        state["history"] = [tuple(entry) for entry in self.history]
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.history = [HistoryEntry(*entry) for entry in self.history]

    def hyperparameters(self) -> dict[str, object]:
        return {"k": self.k, "eps": self.eps, "lr": self.lr, "steps": self.steps, "pro": self.pro,
                "importance_clip": self.importance_clip, "weighting": self.weighting, "tune": self.tune,
                "trainable": list(self.trainable)}


@register_strategy
class FedKSeedPro(FedKSeed):
    """FedKSeed with importance-based seed sampling (``pro=True``); same options otherwise."""

    name = "fedkseed-pro"
    summary_line = "FedKSeed sampling seeds by the magnitude of their past scalars (Qin et al. 2024)"

    def __init__(self, *, k: int = 4096, eps: float = 5e-4, lr: float = 3e-7, steps: int = 200,
                 importance_clip: float = 1000.0, weighting: str = "examples", tune: str = TUNE_FULL,
                 trainable: Sequence[str] | None = None) -> None:
        super().__init__(k=k, eps=eps, lr=lr, steps=steps, pro=True, importance_clip=importance_clip,
                         weighting=weighting, tune=tune, trainable=trainable)


__all__ = ["ClientSteps", "FedKSeed", "FedKSeedPro", "decode_history", "encode_history"]
