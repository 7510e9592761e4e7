"""Fed-SB: federated LoRA-SB, where clients train and the server averages only the r×r matrix R.

Singhal, Ponkshe, Vartak, Varshney, Vepakomma, "Fed-SB: A Silver Bullet for Extreme
Communication Efficiency and Performance in (Private) Federated LoRA Fine-Tuning",
arXiv:2502.15436 (reference code github.com/CERT-Lab/fed-sb).

Every client holds the same frozen B (m×r) and A (r×n) per adapted matrix, from the LoRA-SB
initialisation (:mod:`fedtune.strategies.fed_sb.init`), and trains only R (r×r). Because B and A are shared,
averaging R is exact: s·B·(Σ p_k R_k)·A = Σ p_k s·B·R_k·A, with no cross terms, and each
round moves r² numbers per matrix each way, independent of the number of clients. The
paper averages R uniformly (R_agg = (1/c) Σ R_i); ``weighting="examples"`` weighs clients by
their training examples like the other strategies here. In the private variant the
clients run DP-SGD on R (:mod:`fedtune.privacy`): the noise enters ΔW linearly through
B·ξ·A, with no noise×noise product as when both factors are noisy (FedIT, FLoRA).

Rounds. Until the initialisation has been aggregated, every round is an *init round*
(``init_passes`` of them when all goes well): clients estimate their first full fine-tuning
update ΔW_k and upload linear sketches of it (:mod:`fedtune.strategies.fed_sb.init`): by default a
two-pass randomized range finder (round 1: ΔW_k·Ω; round 2: QᵀΔW_k for the server's
Q = orth(Σ p_k ΔW_k·Ω)), or one single-pass sketch, or ΔW_k itself
(``init_upload="dense"``). The server computes B, R_0, A in float64 with a deterministic
algorithm and *ships* B and A to each client once (4·r·(m+n) bytes per matrix), so every
client holds bitwise the same factors (a digest in each instruction lets the client prove
it). Recomputing them on every client from the aggregated sketch would save no bytes (the
sketches are larger than B and A) and is not bitwise reproducible across LAPACK/BLAS
builds. A pass whose round gets no valid reply is simply asked again in the next round.
Later rounds send R̄ (and the task head), train R (and the head), and average them.

No reply outlives its round: :meth:`FedSB.aggregate` reads only the updates it is given,
builds the new R̄ from them alone, keeps no per-client buffer, and drops an update whose
``lora_sb_round`` metric (the round the client was told, echoed back) is not this round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from fedtune.strategies.aggregation import (
    LORA_A,
    LORA_B,
    check_weighting,
    client_weights,
    lora_modules,
    normalized_weights,
    relative_to,
    weighted_average,
)
from fedtune.strategies.fed_sb.init import (
    LoraSBFactors,
    UpdateSketch,
    factors_from_projection,
    init_from_update,
    low_rank_from_sketch,
    orthonormal_basis,
    parse_init_reply,
    sketch_dims,
    sketch_fingerprint,
    sketch_matrices,
)
from fedtune.strategies.fed_sb.keys import (
    CFG_INIT_ESTIMATOR,
    CFG_INIT_LEARNING_RATE,
    CFG_INIT_RANK,
    CFG_INIT_ROUNDS,
    CFG_INIT_SAMPLES,
    CFG_INIT_SEED,
    CFG_INIT_STAGE,
    CFG_INIT_WARMUP_RATIO,
    CFG_ROUND,
    DENSE_ESTIMATE,
    ESTIMATORS,
    LORA_R,
    LORA_SB_INIT_ROUTINE,
    LORA_SB_ROUTINE,
    METRIC_INIT_STEP_RELATIVE,
    METRIC_ROUND,
    METRIC_SKETCH_FINGERPRINT,
    SKETCH_BASIS,
    SKETCH_CORANGE,
    SKETCH_RANGE,
)
from fedtune.strategies.fed_sb.layer import fold_r_into_a

from fedtune import protocol
from fedtune.errors import AggregationError
from fedtune.protocol import tensor_digest
from fedtune.strategy import (
    AdapterSpec,
    ClientInstruction,
    ClientUpdate,
    Strategy,
    Tensors,
    register_strategy,
    select,
    shapes_of,
)

log = logging.getLogger(__name__)

FROZEN = r"\.lora_[AB]\.weight$"
R_ONLY = r"\.lora_R\.weight$"
NOT_R = r"^(?!.*\.lora_R\.weight$)"
NOT_FROZEN = r"^(?!.*\.lora_[AB]\.weight$)"  # R and the task head


def weighted_sum(parts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """Σ_k p_k·T_k per key in float64 (the aggregate of a linear sketch)."""
    return weighted_average([{k: v.to(torch.float64) for k, v in p.items()} for p in parts], weights)


def federated_init(
    client_estimates: Sequence[Mapping[str, UpdateSketch | torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    *,
    scaling: float = 1.0,
    seed: int = 0,
) -> dict[str, LoraSBFactors]:
    """B, R_0, A per module from the clients' single-pass sketches (or dense estimates), in one step.

    The weighted sum of the clients' sketches is the sketch of ΔW = Σ_k p_k ΔW_k (sketches
    are linear), from which :func:`fedtune.strategies.fed_sb.init.low_rank_from_sketch` recovers the rank-r
    truncation; dense estimates are averaged and decomposed exactly
    (:func:`fedtune.strategies.fed_sb.init.init_from_update`). Deterministic: float64 on the CPU, clients in
    the order given. The server runs this and sends B and A to every client. (The two-pass
    protocol spans two rounds and runs in :meth:`FedSB.aggregate`.)

    Parameters
    ----------
    client_estimates : sequence of dict
        Per client, module -> :class:`~fedtune.strategies.fed_sb.init.UpdateSketch` (made with ``seed``) or
        an m×n ΔW_k; every client must send the same kind for the same modules.
    weights : sequence of float
        Non-negative client weights, normalised to p_k.
    rank : int
        r.
    scaling : float
        s = lora_alpha / r; R_0 = Σ_r / s so that s·B·R_0·A is the truncation.
    seed : int
        The seed the clients' test matrices were drawn with.

    Returns
    -------
    dict of str to LoraSBFactors
        ``(B, R, A)`` per module, float64.
    """
    probs = normalized_weights(weights)
    if len(probs) != len(client_estimates):
        raise AggregationError(f"{len(client_estimates)} client estimates but {len(probs)} weights")
    modules = sorted(client_estimates[0])
    for k, est in enumerate(client_estimates[1:], start=1):
        if sorted(est) != modules:
            diff = sorted(set(modules).symmetric_difference(est))[:3]
            raise AggregationError(f"client {k} sent estimates for other modules than client 0 (e.g. {diff})")
    out = {}
    for module in modules:
        parts = [est[module] for est in client_estimates]
        if all(isinstance(p, UpdateSketch) for p in parts):
            summed = weighted_sum([{"Y": p.range, "W": p.corange} for p in parts], probs)
            m, n = summed["Y"].shape[0], summed["W"].shape[1]
            _, psi = sketch_matrices(module, m, n, rank, seed)
            if summed["W"].shape[0] != psi.shape[0] or summed["Y"].shape[1] != sketch_dims(m, n, rank)[0]:
                shapes = f"{tuple(summed['Y'].shape)}, {tuple(summed['W'].shape)}"
                raise AggregationError(f"{module}: sketch shapes {shapes} do not match rank {rank}; every client "
                                       "must sketch with the same rank")
            out[module] = low_rank_from_sketch(UpdateSketch(summed["Y"], summed["W"]), psi, rank, scaling=scaling)
        elif all(isinstance(p, torch.Tensor) for p in parts):
            delta = weighted_sum([{"dW": p} for p in parts], probs)["dW"]
            out[module] = init_from_update(delta, rank, scaling=scaling)
        else:
            raise AggregationError(f"{module}: clients mixed sketches and dense estimates; send one kind")
    return out


def r_average_error(frozen: Mapping[str, torch.Tensor], client_r: Sequence[Mapping[str, torch.Tensor]],
                    averaged_r: Mapping[str, torch.Tensor], weights: Sequence[float], scaling: float) -> float:
    """‖s·B·R̄·A − Σ_k p_k·s·B·R_k·A‖_F / ‖Σ_k p_k·s·B·R_k·A‖_F over all modules, from the factors.

    Both sides share B, so the difference is s·B·M with M = Σ_k p_k·R_k·A − R̄·A (r×n), and
    ‖B·M‖ = ‖R_b·M‖ with B = Q_b·R_b: one QR of an m×r matrix per module, no m×n matrix. The
    clients' R_k·A are folded as the plain adapters they stand for
    (:func:`fedtune.strategies.fed_sb.layer.fold_r_into_a`, in A's dtype), R̄·A in float64.

    Parameters
    ----------
    frozen : dict
        B and A per module.
    client_r : sequence of dict
        Each client's R per module (other keys are ignored).
    averaged_r : dict
        R̄ per module.
    weights : sequence of float
        Non-negative client weights, normalised to p_k.
    scaling : float
        s = lora_alpha / r.
    """
    probs = normalized_weights(weights)
    clients = [fold_r_into_a({**frozen, **select(r, [R_ONLY])}) for r in client_r]
    num = den = 0.0
    for m in lora_modules(frozen):
        r_b = torch.linalg.qr(frozen[m + LORA_B].to(torch.float64), mode="r").R
        ideal = sum(p * c[m + LORA_A].to(torch.float64) for p, c in zip(probs, clients))
        got = averaged_r[m + LORA_R].to(torch.float64) @ frozen[m + LORA_A].to(torch.float64)
        num += float(torch.linalg.matrix_norm(scaling * (r_b @ (ideal - got)))) ** 2
        den += float(torch.linalg.matrix_norm(scaling * (r_b @ ideal))) ** 2
    return relative_to(num, den)


# Above this, the initial step moves the adapted weights by more than 5 % of their RMS in one go.
INIT_STEP_WARNING = 0.05


def _init_step_scale(updates: Sequence[ClientUpdate], explicit_rate: bool) -> dict[str, float]:
    """The clients' initial step relative to their base weights' RMS (largest), with a warning when large.

    The "adam" estimate −η·sign(G) moves every entry of W by η, so η / RMS(W) is the
    relative size of the jump LoRA-SB's truncation of it starts from.
    """
    ratios = [u.metrics[METRIC_INIT_STEP_RELATIVE] for u in updates if METRIC_INIT_STEP_RELATIVE in u.metrics]
    if not ratios:
        return {}
    largest = max(ratios)
    if largest > INIT_STEP_WARNING:
        fix = ("lower strategy.options.init_learning_rate or leave it unset for the official schedule" if explicit_rate
               else "the official schedule η = train.learning_rate / (init_warmup_ratio · T) gives this; lower "
                    "train.learning_rate, raise strategy.options.init_warmup_ratio or set init_learning_rate")
        log.warning("Fed-SB's initial step moves the adapted weights by %.1f%% of their RMS (η / RMS(W)); %s",
                    100 * largest, fix)
    return {METRIC_INIT_STEP_RELATIVE: largest}


@register_strategy
class FedSB(Strategy):
    """Frozen shared B and A from a federated LoRA-SB initialisation; train and average R only.

    Parameters
    ----------
    weighting : {"examples", "uniform"}
        p_k proportional to each client's training examples, or equal (the paper).
    init_upload : {"sketch", "dense"}
        What a client uploads for the initialisation: linear sketches of its update estimate
        (see ``init_passes``) or the m×n estimate itself (one round, 4·m·n bytes per matrix).
    init_passes : int
        Sketch passes (init rounds): 1 = single-pass sketch, 4·((2r+1)·m + (4r+3)·n) bytes up;
        2 = two-pass range finder, 4·(2r+1)·(m+n) up and 4·(2r+1)·m down; 2 + 2q = q power
        iterations on top, each 4·(2r+1)·(m+n) more each way. More passes, closer to the
        optimal truncation.
    init_samples : int
        Examples each client uses to estimate its first update.
    init_estimator : {"adam", "sgd"}
        −η·sign(G) (Adam's first step; the paper) or −η·G/N (SGD's; linear in the data).
    init_learning_rate : float, optional
        η of the estimated first step. By default the official LoRA-SB schedule:
        ``train.learning_rate / (init_warmup_ratio · T)`` with T the client's optimizer steps
        over the run's training rounds (rounds after the initialisation × steps per round).
    init_warmup_ratio : float
        The warmup ratio of that schedule (0.06, the reference GLUE setting).
    resend_frozen : bool
        Send B and A with every instruction, not only to clients that have not had them
        (costs 4·r·(m+n) bytes per matrix per round; survives client restarts).
    """

    name = "fed-sb"
    linear_lora_only = True
    supports_quantized_base = False
    quantized_base_reason = ("its initialisation needs gradients with respect to the base weights, which a "
                             "bitsandbytes 4-bit or 8-bit layer does not provide")
    summary_line = "frozen B, A from the first-update SVD; train and average r×r R only (Singhal et al. 2025); exact"
    averages_updates = True
    client_dp_reason = ("its initialisation rounds send sketches of each client's first updates, which "
                        "client-level clipping and noise do not cover; its private variant is example-level")

    def __init__(self, *, weighting: str = "examples", init_upload: str = "sketch", init_passes: int = 2,
                 init_samples: int = 64, init_estimator: str = "adam", init_learning_rate: float | None = None,
                 init_warmup_ratio: float = 0.06, resend_frozen: bool = False) -> None:
        if init_upload not in ("sketch", "dense"):
            raise ValueError(f"init_upload={init_upload!r} must be 'sketch' or 'dense'")
        if not (isinstance(init_passes, int) and (init_passes == 1 or (init_passes >= 2 and init_passes % 2 == 0))):
            raise ValueError(f"init_passes={init_passes!r} must be 1 (single-pass sketch) or even: 2 (two-pass "
                             "range finder), 4 (one power iteration), ...")
        if init_estimator not in ESTIMATORS:
            raise ValueError(f"init_estimator={init_estimator!r} must be one of {ESTIMATORS}")
        if not (isinstance(init_samples, int) and init_samples >= 1):
            raise ValueError(f"init_samples={init_samples!r} must be a positive integer, e.g. 64")
        if init_learning_rate is not None and not init_learning_rate > 0:
            raise ValueError(f"init_learning_rate={init_learning_rate} must be positive, or null for the official "
                             "schedule, train.learning_rate / (init_warmup_ratio · training steps)")
        if not 0 < init_warmup_ratio <= 1:
            raise ValueError(f"init_warmup_ratio={init_warmup_ratio} must be in (0, 1], e.g. 0.06")
        self.weighting = check_weighting(weighting)
        self.init_upload = init_upload
        self.init_passes = init_passes
        self.init_samples = init_samples
        self.init_estimator = init_estimator
        self.init_learning_rate = init_learning_rate
        self.init_warmup_ratio = init_warmup_ratio
        self.resend_frozen = resend_frozen
        self._frozen: Tensors = {}  # B and A after the initialisation
        self._trained: Tensors = {}  # R and the head
        self._digest = ""
        self._has_frozen: set[int] = set()

    # ------------------------------------------------------------------ set-up
    def initialize(self, spec: AdapterSpec) -> None:
        super().initialize(spec)
        initial = {k: v.detach().clone() for k, v in spec.initial.items() if not k.endswith(LORA_R)}
        self._plain = select(initial, [FROZEN])  # PEFT's initial A and B, the model until the init ends
        self._modules = lora_modules(self._plain)
        if not self._modules:
            raise ValueError("fed-sb needs LoRA adapter tensors (X.lora_A.weight / X.lora_B.weight) in the spec")
        self._dtype = self._plain[self._modules[0] + LORA_A].dtype
        self._shapes = {m: (self._plain[m + LORA_B].shape[0], self._plain[m + LORA_A].shape[1]) for m in self._modules}
        rank = self._plain[self._modules[0] + LORA_A].shape[0]
        if rank != spec.rank:
            raise ValueError(f"the adapter tensors have rank {rank} but spec.rank={spec.rank}")
        identity = {m + LORA_R: torch.eye(rank, dtype=self._dtype) for m in self._modules}
        self._trained = {**identity, **select(initial, [NOT_FROZEN])}
        self._init_seed = int(spec.seed) * 1_000_003 + 17  # the sketches' test matrices
        self._frozen, self._digest = {}, ""
        if self.init_upload == "dense":
            self._stage = "dense"
        else:
            self._stage = "single" if self.init_passes == 1 else "range"
        self._bases: Tensors = {}  # what the next pass sends: Q (m×k) before "corange", P (n×k) before "range"
        self._power_left = max(0, (self.init_passes - 2) // 2)

    @property
    def initialized(self) -> bool:
        """Whether the LoRA-SB initialisation has been aggregated (B and A are fixed)."""
        return bool(self._frozen)

    # ------------------------------------------------------------------ instructions
    def _init_expects(self) -> dict[str, tuple[int, ...]]:
        expects: dict[str, tuple[int, ...]] = {}
        for module, (m, n) in self._shapes.items():
            k, l = sketch_dims(m, n, self.spec.rank)
            if self._stage == "dense":
                expects[module + DENSE_ESTIMATE] = (m, n)
            if self._stage in ("single", "range"):
                expects[module + SKETCH_RANGE] = (m, k)
            if self._stage in ("single", "corange"):
                expects[module + SKETCH_CORANGE] = (l if self._stage == "single" else k, n)
        return expects

    def _init_instruction(self, server_round: int) -> ClientInstruction:
        config = {CFG_ROUND: server_round, CFG_INIT_STAGE: self._stage, CFG_INIT_SEED: self._init_seed,
                  CFG_INIT_RANK: self.spec.rank, CFG_INIT_SAMPLES: self.init_samples,
                  CFG_INIT_ESTIMATOR: self.init_estimator, CFG_INIT_WARMUP_RATIO: self.init_warmup_ratio,
                  CFG_INIT_ROUNDS: self.init_rounds()}
        if self.init_learning_rate is not None:
            config[CFG_INIT_LEARNING_RATE] = self.init_learning_rate
        arrays = {module + SKETCH_BASIS: basis for module, basis in self._bases.items()}
        return ClientInstruction(arrays=arrays, trainable=(), expects=self._init_expects(), routine=LORA_SB_INIT_ROUTINE,
                                 options=config)

    def configure_client(self, server_round: int, node_id: int) -> ClientInstruction:
        if not self.initialized:
            return self._init_instruction(server_round)
        arrays = dict(self._trained)
        if self.resend_frozen or node_id not in self._has_frozen:
            arrays.update(self._frozen)
            self._has_frozen.add(node_id)
        return ClientInstruction(
            arrays=arrays,
            trainable=(NOT_FROZEN,),
            expects=shapes_of(self._trained),
            routine=LORA_SB_ROUTINE,
            options={CFG_ROUND: server_round, protocol.FROZEN_PATTERN: FROZEN, protocol.FROZEN_DIGEST: self._digest},
        )

    # ------------------------------------------------------------------ aggregation
    def _current(self, server_round: int, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
        """The updates that belong to this round (a reply echoing another round is dropped)."""
        fresh = [u for u in updates if u.metrics.get(METRIC_ROUND, server_round) == server_round]
        if len(fresh) < len(updates):
            log.warning("round %d: dropped %d replies made for another round", server_round, len(updates) - len(fresh))
        if not fresh:
            raise AggregationError(f"round {server_round}: no update was made for this round")
        return fresh

    def _weights(self, updates: Sequence[ClientUpdate]) -> list[float]:
        return client_weights(updates, self.weighting)

    def aggregate(self, server_round: int, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        fresh = self._current(server_round, updates)
        stale = float(len(updates) - len(fresh))
        metrics = self._aggregate_init(fresh) if not self.initialized else self._aggregate_r(fresh)
        return {**metrics, "stale_dropped": stale}

    def _check_fingerprints(self, updates: Sequence[ClientUpdate]) -> None:
        expected = sketch_fingerprint(self._init_seed)
        for u in updates:
            got = u.metrics.get(METRIC_SKETCH_FINGERPRINT)
            if got is not None and got != expected:
                raise AggregationError(f"client {u.node_id} drew other sketch test matrices (fingerprint {got!r}, "
                                       f"server {expected!r}); every party needs the same NumPy random streams")

    def _aggregate_init(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """Fold one init pass; set B, A and R_0 after the last one."""
        self._check_fingerprints(updates)
        weights, replies = self._weights(updates), [parse_init_reply(u.arrays) for u in updates]
        stage, metrics = self._stage, {"init_clients": float(len(updates)), **_init_step_scale(updates, self.init_learning_rate is not None)}
        if stage in ("single", "dense"):
            estimates = [{m: UpdateSketch(p["range"], p["corange"]) if stage == "single" else p["dense"]
                          for m, p in reply.items()} for reply in replies]
            return {**metrics, **self._set_factors(federated_init(
                estimates, weights, self.spec.rank, scaling=self.spec.scaling, seed=self._init_seed))}
        part = "range" if stage == "range" else "corange"
        summed = weighted_sum([{m: p[part] for m, p in reply.items()} for reply in replies], weights)
        if stage == "range":  # Q = orth(Σ p_k ΔW_k·Ω) (or ·P), sent in the corange pass
            self._bases = {m: orthonormal_basis(y).to(self._dtype) for m, y in summed.items()}
            self._stage = "corange"
        elif self._power_left > 0:  # power iteration: P = orth((Σ p_k QᵀΔW_k)ᵀ), sent in a range pass
            self._bases = {m: orthonormal_basis(z.T).to(self._dtype) for m, z in summed.items()}
            self._power_left -= 1
            self._stage = "range"
        else:  # the last pass: SVD of QᵀΔW with the Q the clients used
            factors = {m: factors_from_projection(self._bases[m], z, self.spec.rank, scaling=self.spec.scaling)
                       for m, z in summed.items()}
            return {**metrics, **self._set_factors(factors)}
        return {**metrics, "init_pass_done": 1.0}

    def _set_factors(self, factors: Mapping[str, LoraSBFactors]) -> dict[str, float]:
        if sorted(factors) != self._modules:
            raise AggregationError(f"init replies cover modules {sorted(factors)[:3]}..., the adapter has "
                                   f"{self._modules[:3]}...; every client must sketch every adapted module")
        for module, (b, r, a) in factors.items():
            self._frozen[module + LORA_B] = b.to(self._dtype)
            self._frozen[module + LORA_A] = a.to(self._dtype)
            self._trained[module + LORA_R] = r.to(self._dtype)
        self._digest = tensor_digest(self._frozen)
        self._has_frozen.clear()
        self._bases, self._stage = {}, None
        top = max(float(f.R.diagonal().max()) for f in factors.values()) * self.spec.scaling
        return {"init_top_singular_value": top}

    def _aggregate_r(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        weights = self._weights(updates)
        self._trained = self.average([u.arrays for u in updates], weights, previous=self._trained)
        # Measured, not assumed: the ideal is the clients' own updates, averaged.
        error = r_average_error(self._frozen, [u.arrays for u in updates], self._trained, weights, self.spec.scaling)
        return {"aggregation_error": error}

    # ------------------------------------------------------------------ the global model
    def global_adapter(self) -> Tensors:
        """The global model as a plain PEFT LoRA adapter: A' = R̄·A (before the init, PEFT's initial A and B)."""
        if not self.initialized:
            return {**self._plain, **select(self._trained, [NOT_R])}
        return fold_r_into_a({**self._frozen, **self._trained})

    def lora_sb_tensors(self) -> Tensors:
        """B, A, R̄ and the head as LoRA-SB tensors (what a LoRA-SB client holds after loading)."""
        return {**(self._frozen or self._plain), **self._trained}

    def init_rounds(self) -> int:
        """Rounds the initialisation takes before R is trained."""
        return 1 if self.init_upload == "dense" else self.init_passes

    def config_problems(self, cfg: Any) -> list[str]:
        if cfg.federation.num_rounds <= self.init_rounds():
            return [f"federation.num_rounds={cfg.federation.num_rounds} leaves no training round after fed-sb's "
                    f"{self.init_rounds()} initialisation round(s); use at least {self.init_rounds() + 1}"]
        return []

    def hyperparameters(self) -> dict[str, object]:
        return {"weighting": self.weighting, "init_upload": self.init_upload, "init_passes": self.init_passes,
                "init_samples": self.init_samples, "init_estimator": self.init_estimator,
                "init_learning_rate": self.init_learning_rate, "init_warmup_ratio": self.init_warmup_ratio,
                "resend_frozen": self.resend_frozen}


__all__ = ["FedSB", "federated_init", "r_average_error", "weighted_sum"]
