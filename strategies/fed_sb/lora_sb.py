"""LoRA-SB: a trainable r×r matrix R between frozen LoRA factors, initialised from the first update.

LoRA-SB (Ponkshe, Singhal et al., "Initialization using Update Approximation is a Silver
Bullet for Extremely Efficient Low-Rank Fine-Tuning", arXiv:2411.19557; reference code
github.com/CERT-Lab/lora-sb) adapts a weight as

    W = W0 + s · B · R · A,    B (m×r) and A (r×n) frozen, only R (r×r) trained,

(the LoRA-XS architecture) and initialises it from an approximation of the first step of
full fine-tuning:

* ΔW ≈ −η · sign(Σ_i ∇_W ℓ_i) over a few samples: Adam's first step is
  −η · g / (|g| + ε) ≈ −η · sign(g) (the reference code's ``estimate_and_process_grads``:
  sum of per-sample gradients, then ``-lr * torch.sign``);
* U Σ Vᵀ = SVD(ΔW), B = U_r, A = V_rᵀ, R = Σ_r / s, so that s·B·R·A is the best rank-r
  approximation of ΔW (Eckart–Young). The paper's Algorithm 1 writes R_init = Σ_r / s; the
  reference code uses α = r (s = 1) and R_init = Σ_r. W0 is not modified: the model starts
  at W0 + ΔW_r, i.e. the initialisation *is* the approximated first step.

How it sits on PEFT (0.21): a standard PEFT LoRA of rank r is attached as usual; :func:`attach_r`
adds ``lora_R[adapter]`` (an ``nn.Linear(r, r, bias=False)``) to every LoRA layer and installs
:class:`LoraSBVariant` as that adapter's PEFT *LoRA variant* (the hook PEFT uses for DoRA), so
PEFT's own forward, ``merge``/``unmerge``/``merge_and_unload`` and mixed-adapter batches all go
through s·B·R·A. State-dict names of A and B are unchanged; R is ``<module>.lora_R.weight``.
R starts as the identity, so attaching it does not change what the model computes, and a
plain LoRA adapter loaded into a LoRA-SB layer (R left at its initial identity) computes
exactly what it computes in plain PEFT. :func:`fold_r_into_a` turns LoRA-SB tensors into a
plain PEFT LoRA adapter (A' = R·A, same rank and scaling) that ``PeftModel.from_pretrained``
reads.

Federated initialisation (client side here; the server side is in :mod:`fedtune.strategies.fed_sb.strategy`):
no raw data and no dense m×n matrix leaves a client. Each client k estimates its own first
update ΔW_k (:func:`estimate_update`) and uploads linear sketches of it; linear, so the
weighted sum of the clients' sketches is the sketch of ΔW = Σ p_k ΔW_k. Two protocols:

* two-pass randomized range finder (default; Halko, Martinsson, Tropp, SIAM Review 2011):
  pass 1, clients send ΔW_k·Ω (m×k, Ω n×k Gaussian from the shared seed) and the server
  forms Q = orth(Σ p_k ΔW_k·Ω); pass 2, the server sends Q and clients send QᵀΔW_k (k×n);
  the SVD of Σ p_k QᵀΔW_k gives B, R, A (:func:`factors_from_projection`). Each power
  iteration adds two passes and brings the result closer to the optimal truncation.
* single pass (Tropp, Yurtsever, Udell, Cevher, "Practical sketching algorithms for
  low-rank matrix approximation", SIAM J. Matrix Anal. Appl. 2017): ΔW_k·Ω and Ψ·ΔW_k in
  one upload (:func:`sketch_update`, :func:`low_rank_from_sketch`).

With k = 2r+1, measured on synthetic sign matrices like Adam's first step (sign of a rank-3
matrix plus noise; 64×48 and 384×384, r = 4 and 8), the Frobenius residual is 1.4–1.55× the
optimal rank-r residual for the single pass, 1.14–1.16× for two passes and ≤ 1.007× with one
power iteration (four passes). Both are exact when rank ΔW ≤ k. The server computes B and
A and ships them to every client. Bytes per adapted m×n matrix and client
(:func:`sketch_bytes`, float32): two-pass upload 4·(2r+1)·(m+n), download 4·(2r+1)·m (Q)
+ 4·r·(m+n) (B, A), once; then 4·r² each way per round.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from peft.tuners.lora.layer import LoraLayer, LoraVariant
from peft.utils.other import transpose
from torch import nn

LORA_A, LORA_B, LORA_R = ".lora_A.weight", ".lora_B.weight", ".lora_R.weight"
R_LAYER = "lora_R"

# Client routines (ClientInstruction.mode) a LoRA-SB federation asks for.
LORA_SB_INIT_MODE = "lora-sb-init"  # estimate the first update, reply with its sketch
LORA_SB_MODE = "lora-sb"  # AdamW on R (and the head) with B and A frozen

# ClientInstruction.config keys (sent under protocol.STRATEGY_PREFIX by the glue).
CFG_ROUND = "round"
CFG_INIT_SEED = "init_seed"
CFG_INIT_RANK = "init_rank"
CFG_INIT_SAMPLES = "init_samples"
CFG_INIT_ESTIMATOR = "init_estimator"
CFG_INIT_STAGE = "init_stage"  # one of INIT_STAGES
CFG_INIT_LEARNING_RATE = "init_learning_rate"
# MetricRecord keys a LoRA-SB client adds to its reply.
METRIC_ROUND = "lora_sb_round"
METRIC_SKETCH_FINGERPRINT = "lora_sb_sketch_fingerprint"

ESTIMATORS = ("adam", "sgd")
INIT_STAGES = ("single", "range", "corange", "dense")
SKETCH_RANGE, SKETCH_CORANGE, DENSE_ESTIMATE = ".sketch_range", ".sketch_corange", ".update_estimate"
SKETCH_BASIS = ".sketch_basis"  # server -> client: Q (m×k) or P (n×k) of a multi-pass init


class LoraSBFactors(NamedTuple):
    """The LoRA-SB factors of one adapted matrix: s·B·R·A with B m×r, R r×r, A r×n."""

    B: torch.Tensor
    R: torch.Tensor
    A: torch.Tensor


class UpdateSketch(NamedTuple):
    """A single-pass sketch of an m×n matrix ΔW: ``range`` = ΔW·Ω (m×k), ``corange`` = Ψ·ΔW (l×n)."""

    range: torch.Tensor
    corange: torch.Tensor


# --------------------------------------------------------------------------- the PEFT layer


def _delta_weight(module: LoraLayer, adapter: str) -> torch.Tensor:
    """s·B·R·A in the base layer's weight layout (transposed for ``fan_in_fan_out`` layers)."""
    b = module.lora_B[adapter].weight
    a = module.lora_A[adapter].weight
    r = getattr(module, R_LAYER)[adapter].weight
    compute = torch.float32 if b.dtype in (torch.float16, torch.bfloat16) and b.device.type == "cpu" else b.dtype
    delta = transpose(b.to(compute) @ r.to(compute) @ a.to(compute), module.fan_in_fan_out) * module.scaling[adapter]
    return delta.to(b.dtype)


class LoraSBVariant(LoraVariant):
    """PEFT LoRA variant computing ``result + s · B(R(A(dropout(x))))``, and merging s·B·R·A."""

    def supports_lora_conversion(self) -> bool:
        # PEFT's converter reads get_delta_weight, which knows nothing of R; use fold_r_into_a.
        return False

    @staticmethod
    def init(module: LoraLayer, adapter_name: str, **kwargs: Any) -> None:
        """Nothing to do: :func:`attach_r` creates R after PEFT has built the layer."""

    @staticmethod
    def merge_safe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module: LoraLayer, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module: LoraLayer, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        lora_a, lora_b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        lora_r = getattr(module, R_LAYER)[active_adapter]
        dropout, scaling = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        return result + lora_b(lora_r(lora_a(dropout(x)))) * scaling


def lora_layers(peft_model: nn.Module, adapter_name: str = "default") -> dict[str, LoraLayer]:
    """The model's LoRA layers that carry ``adapter_name``, keyed by module name (the wire prefix).

    Raises
    ------
    ValueError
        When no layer carries the adapter (the message lists the adapters that exist).
    """
    layers = {name: m for name, m in peft_model.named_modules()
              if isinstance(m, LoraLayer) and adapter_name in m.lora_A}
    if not layers:
        found = sorted({a for m in peft_model.modules() if isinstance(m, LoraLayer) for a in m.lora_A})
        raise ValueError(f"adapter_name={adapter_name!r} is on no LoRA layer of this model (adapters found: "
                         f"{found or 'none'}); attach a PEFT LoRA adapter first, e.g. with get_peft_model")
    return layers


def _check_supported(name: str, layer: LoraLayer, adapter_name: str) -> None:
    variant = layer.lora_variant.get(adapter_name)
    if variant is not None and not isinstance(variant, LoraSBVariant):
        raise ValueError(f"{name}: adapter {adapter_name!r} already uses the LoRA variant {type(variant).__name__} "
                         "(DoRA, aLoRA, ...); LoRA-SB needs a plain LoRA adapter (use_dora=False)")
    if not isinstance(layer.lora_A[adapter_name], nn.Linear):
        raise TypeError(f"{name}: LoRA-SB supports LoRA on linear layers (nn.Linear, Conv1D), whose lora_A is an "
                        f"nn.Linear; got {type(layer.lora_A[adapter_name]).__name__}. Leave this module out of "
                        "target_modules")
    if layer.lora_bias.get(adapter_name, False):
        raise ValueError(f"{name}: LoRA-SB does not support lora_bias=True; set LoraConfig(lora_bias=False)")


def _freeze_factors(layer: LoraLayer, adapter_name: str) -> None:
    """Keep A and B frozen, also after PEFT's ``set_adapter`` (which re-enables adapter weights)."""
    frozen = dict(layer.frozen_peft_weight_names)
    frozen[adapter_name] = tuple(sorted({*frozen.get(adapter_name, ()), "lora_A", "lora_B"}))
    layer.frozen_peft_weight_names = frozen
    layer.lora_A[adapter_name].requires_grad_(False)
    layer.lora_B[adapter_name].requires_grad_(False)


def attach_r(peft_model: nn.Module, adapter_name: str = "default", rank: int | None = None) -> dict[str, nn.Parameter]:
    """Make ``adapter_name`` a LoRA-SB adapter: add a trainable r×r R between A and B on every layer.

    R starts as the identity (the model computes the same as before), A and B are frozen,
    and the layer's PEFT LoRA variant becomes :class:`LoraSBVariant`. Calling it again
    returns the R already attached.

    Parameters
    ----------
    peft_model : torch.nn.Module
        A PEFT model (or any module) with LoRA layers carrying ``adapter_name``.
    adapter_name : str
        The PEFT adapter to convert.
    rank : int, optional
        The expected LoRA rank; a layer of another rank is an error.

    Returns
    -------
    dict of str to torch.nn.Parameter
        R of every layer, keyed ``<module>.lora_R.weight`` (the wire name; the PEFT parameter is
        ``<module>.lora_R.<adapter>.weight``).
    """
    out = {}
    for name, layer in lora_layers(peft_model, adapter_name).items():
        _check_supported(name, layer, adapter_name)
        r = layer.r[adapter_name]
        if rank is not None and r != rank:
            raise ValueError(f"{name}: adapter {adapter_name!r} has rank {r}, but rank={rank} was asked for; "
                             "build the LoRA adapter with the rank LoRA-SB should use")
        if not hasattr(layer, R_LAYER):
            setattr(layer, R_LAYER, nn.ModuleDict())
            layer.adapter_layer_names = (*layer.adapter_layer_names, R_LAYER)
        r_layers = getattr(layer, R_LAYER)
        if adapter_name not in r_layers:
            weight_a = layer.lora_A[adapter_name].weight
            linear = nn.Linear(r, r, bias=False, device=weight_a.device, dtype=weight_a.dtype)
            with torch.no_grad():
                linear.weight.copy_(torch.eye(r, dtype=weight_a.dtype))
            r_layers[adapter_name] = linear
            layer.lora_variant[adapter_name] = LoraSBVariant()
        _freeze_factors(layer, adapter_name)
        r_layers[adapter_name].weight.requires_grad_(True)
        out[name + LORA_R] = r_layers[adapter_name].weight
    return out


def fold_r_into_a(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA-SB tensors as a plain PEFT LoRA adapter: A' = R·A, R dropped, everything else kept.

    The result has the same rank and scaling, so it loads into a ``LoraConfig`` with the same
    ``r`` and ``lora_alpha`` and computes s·B·(R·A) = s·B·R·A. The product is taken in float64
    and cast to A's dtype. Inputs are not modified.
    """
    out = {k: v for k, v in tensors.items() if not k.endswith(LORA_R)}
    for key, r in tensors.items():
        if not key.endswith(LORA_R):
            continue
        a_key = key[: -len(LORA_R)] + LORA_A
        if a_key not in tensors:
            raise KeyError(f"{key} has no partner {a_key}; fold needs each module's R and A together")
        a = tensors[a_key]
        if r.shape != (a.shape[0], a.shape[0]):
            raise ValueError(f"{key} has shape {tuple(r.shape)}; it must be r×r with r = {a.shape[0]} "
                             f"(rows of {a_key})")
        out[a_key] = (r.detach().to(torch.float64) @ a.detach().to(torch.float64)).to(a.dtype)
    return out


def r_identity(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An identity R for every module that has ``X.lora_A.weight`` (what :func:`attach_r` starts with)."""
    return {k[: -len(LORA_A)] + LORA_R: torch.eye(v.shape[0], dtype=v.dtype)
            for k, v in tensors.items() if k.endswith(LORA_A)}


# --------------------------------------------------------------------------- adapter handles (wiring helpers)


def prepare_handle(handle: Any, rank: int | None = None) -> list[str]:
    """Attach R to an :class:`fedtune.models.AdapterHandle` and register it as an adapter tensor.

    R joins ``handle.params`` (so ``load``/``state``/``set_trainable`` see it) with the
    identity as its initial value. Idempotent. Returns the R wire names.
    """
    r_params = attach_r(handle.model, handle.adapter_name, rank)
    for key, param in r_params.items():
        handle.params[key] = param
        handle.initial.setdefault(key, param.detach().clone())
    return sorted(r_params)


def adopt_frozen(handle: Any, tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Make the received B and A the handle's *initial* values, so later loads keep them.

    ``AdapterHandle.load`` resets every tensor it is not given to its initial value; after
    the init round the server sends only R (and the head), so B and A must become the
    initial values. Returns the names adopted.
    """
    adopted = []
    for key, value in tensors.items():
        if key.endswith((LORA_A, LORA_B)) and key in handle.initial:
            if tuple(value.shape) != tuple(handle.initial[key].shape):
                raise ValueError(f"{key}: shape {tuple(value.shape)} does not fit {tuple(handle.initial[key].shape)}")
            handle.initial[key] = value.detach().to(handle.initial[key].dtype).clone()
            adopted.append(key)
    return sorted(adopted)


# --------------------------------------------------------------------------- first-update estimate


def _batch_size(batch: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _examples(batch: Mapping[str, torch.Tensor]) -> Iterable[dict[str, torch.Tensor]]:
    for i in range(_batch_size(batch)):
        yield {k: v[i:i + 1] for k, v in batch.items()}


def _take(batch: Mapping[str, torch.Tensor], count: int) -> dict[str, torch.Tensor]:
    return {k: v[:count] for k, v in batch.items()}


def estimate_update(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    learning_rate: float,
    adapter_name: str = "default",
    estimator: str = "adam",
    max_examples: int | None = None,
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Estimate the first full fine-tuning update of every LoRA-adapted weight.

    The gradient of the loss with respect to each base weight W0 is summed over the
    examples (batch-mean losses weighted by batch size), then turned into one optimizer
    step: ``"adam"`` gives −η·sign(G), Adam's first step with ε → 0 (LoRA-SB, §4 and the
    reference ``estimate_and_process_grads``); ``"sgd"`` gives −η·G/N, the first SGD step,
    which is linear in the data (the average of the clients' estimates is then exactly the
    pooled estimate). The model runs in eval mode (no dropout), so the estimate is a
    deterministic function of the data; the reference code leaves dropout on.

    Parameters
    ----------
    model : torch.nn.Module
        A PEFT model whose LoRA path currently adds nothing or what it should (call this
        before training); ``model(**batch).loss`` must be the mean loss of the batch.
    batches : iterable of dict
        Batches of model inputs with labels, batch dimension first.
    learning_rate : float
        η, the learning rate of the first step (positive).
    adapter_name : str
        Which LoRA adapter's target layers to estimate.
    estimator : {"adam", "sgd"}
        The optimizer whose first step is estimated.
    max_examples : int, optional
        Stop after this many examples.
    clip_norm, noise_multiplier : float, optional
        Differentially private estimate: each example's gradient (all target matrices
        together) is clipped to ``clip_norm`` and Gaussian noise of standard deviation
        ``noise_multiplier · clip_norm`` is added to the sum before ``sign``/averaging
        (one Gaussian mechanism of sensitivity ``clip_norm``; account for it with
        :class:`fedtune.privacy.PrivacyLedger`). Per-example gradients cost one backward
        pass per example.
    generator : torch.Generator, optional
        The noise source (CPU).

    Returns
    -------
    dict of str to Tensor
        ΔW (out_features × in_features, float32) per adapted module, keyed by module name.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r} must be one of {ESTIMATORS}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate={learning_rate} must be positive (the first step's η)")
    if clip_norm is not None and not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm} must be positive, or None for no clipping")
    if noise_multiplier < 0 or (noise_multiplier > 0 and clip_norm is None):
        raise ValueError(f"noise_multiplier={noise_multiplier} needs clip_norm and must be non-negative")
    layers = lora_layers(model, adapter_name)
    weights = {name: layer.get_base_layer().weight for name, layer in layers.items()}
    bad = [n for n, w in weights.items() if not w.is_floating_point()]
    if bad:
        raise TypeError(f"estimate_update needs floating-point base weights; {bad[:2]} are "
                        f"{weights[bad[0]].dtype} (quantized?): estimate on a float copy of the model")
    totals, seen = _gradient_sum(model, weights, batches, max_examples, clip_norm)
    if seen == 0:
        raise ValueError("estimate_update got no examples; give at least one batch")
    if noise_multiplier > 0:
        for total in totals.values():
            total += torch.randn(total.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * clip_norm)
    out = {}
    for name, total in totals.items():
        step = -learning_rate * (torch.sign(total) if estimator == "adam" else total / seen)
        out[name] = transpose(step, layers[name].fan_in_fan_out).to(torch.float32).contiguous()
    return out


def _gradient_sum(model: nn.Module, weights: Mapping[str, torch.Tensor],
                  batches: Iterable[Mapping[str, torch.Tensor]], max_examples: int | None,
                  clip_norm: float | None) -> tuple[dict[str, torch.Tensor], int]:
    """Σ of per-example gradients (clipped jointly when ``clip_norm``), float64, and the count."""
    names, params = list(weights), list(weights.values())
    totals = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in weights.items()}
    saved = [p.requires_grad for p in params]
    was_training, seen = model.training, 0
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in batches:
            if max_examples is not None:
                if seen >= max_examples:
                    break
                batch = _take(batch, max_examples - seen)
            for part in (_examples(batch) if clip_norm is not None else [batch]):
                count = _batch_size(part)
                loss = model(**part).loss
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
                factor = float(count)
                if clip_norm is not None:
                    norm = float(torch.sqrt(sum(g.detach().to(torch.float64).pow(2).sum() for g in grads)))
                    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
                for n, g in zip(names, grads):
                    totals[n] += factor * g.detach().to(torch.float64).cpu()
                seen += count
    finally:
        for p, flag in zip(params, saved):
            p.requires_grad_(flag)
        model.train(was_training)
    return totals, seen


# --------------------------------------------------------------------------- initialisation from ΔW


def canonical_signs(u: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip singular-vector pairs so each column of ``u`` has its largest-magnitude entry positive.

    U·diag(S)·Vh is unchanged; the sign convention makes the factors a function of ΔW alone
    rather than of the LAPACK build.
    """
    idx = u.abs().argmax(dim=0)
    signs = torch.sign(u[idx, torch.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, vh * signs[:, None]


def init_from_update(delta_w: torch.Tensor, rank: int, *, scaling: float = 1.0) -> LoraSBFactors:
    """LoRA-SB factors from an update estimate: B = U_r, R = Σ_r / s, A = V_rᵀ.

    With U Σ Vᵀ the SVD of ``delta_w`` (float64), s·B·R·A is the best rank-``rank``
    approximation of ΔW (LoRA-SB, Algorithm 1; Eckart–Young).

    Parameters
    ----------
    delta_w : Tensor
        The m×n update estimate (e.g. from :func:`estimate_update`).
    rank : int
        r, at most min(m, n).
    scaling : float
        s = lora_alpha / r of the adapter that will hold the factors.

    Returns
    -------
    LoraSBFactors
        ``(B, R, A)`` in float64: B m×r and A r×n with orthonormal columns / rows, R diagonal.
    """
    d = _check_matrix(delta_w, rank, scaling)
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    return _factors(u, s, vh, rank, scaling)


def _check_matrix(delta_w: torch.Tensor, rank: int, scaling: float) -> torch.Tensor:
    if delta_w.dim() != 2:
        raise ValueError(f"delta_w has shape {tuple(delta_w.shape)}; it must be a 2-D (out × in) matrix")
    if not 1 <= rank <= min(delta_w.shape):
        raise ValueError(f"rank={rank} must be between 1 and min{tuple(delta_w.shape)} = {min(delta_w.shape)}")
    if not scaling > 0:
        raise ValueError(f"scaling={scaling} must be positive (lora_alpha / r)")
    d = delta_w.detach().to(torch.float64).cpu()
    if not torch.isfinite(d).all():
        raise ValueError("delta_w contains NaN or infinite values; check the gradient estimate")
    return d


def _factors(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int, scaling: float) -> LoraSBFactors:
    u_r, vh_r = canonical_signs(u[:, :rank], vh[:rank])
    return LoraSBFactors(B=u_r.contiguous(), R=torch.diag(s[:rank]) / scaling, A=vh_r.contiguous())


# --------------------------------------------------------------------------- sketches of ΔW


def sketch_dims(m: int, n: int, rank: int) -> tuple[int, int]:
    """Sketch sizes (k, l) = (2r+1, 2k+1), capped by the matrix size.

    k = r + p columns with oversampling p = r + 1 for the range; l > k rows for the
    single-pass co-range (Tropp et al. 2017 need l > k and recommend oversampling both).
    """
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank={rank} must be between 1 and min({m}, {n})")
    k = min(2 * rank + 1, m, n)
    return k, min(2 * k + 1, m)


def sketch_matrices(module: str, m: int, n: int, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared Gaussian test matrices Ω (n×k) and Ψ (l×m) of one module, in float64.

    Drawn with NumPy's PCG64 and ziggurat from ``SeedSequence((seed, crc32(module), m, n, k, l))``
    on the CPU, so every client and the server get the same numbers whatever their device
    or thread count (:func:`sketch_fingerprint` lets a client prove it).
    """
    k, l = sketch_dims(m, n, rank)
    entropy = (int(seed) & 0xFFFFFFFF, zlib.crc32(module.encode()), m, n, k, l)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
    omega = rng.standard_normal((n, k), dtype=np.float64)
    psi = rng.standard_normal((l, m), dtype=np.float64)
    return torch.from_numpy(omega), torch.from_numpy(psi)


def sketch_fingerprint(seed: int) -> float:
    """A number every installation must reproduce bit for bit: the sum of a fixed probe's entries."""
    omega, psi = sketch_matrices("fingerprint", 8, 8, 1, seed)
    return float(omega.sum() + psi.sum())


def sketch_update(delta_w: torch.Tensor, *, module: str, rank: int, seed: int,
                  dtype: torch.dtype = torch.float32) -> UpdateSketch:
    """The single-pass sketch (ΔW·Ω, Ψ·ΔW) of Tropp et al. (2017), computed in float64, returned in ``dtype``."""
    m, n = delta_w.shape
    omega, psi = sketch_matrices(module, m, n, rank, seed)
    d = delta_w.detach().to(torch.float64).cpu()
    return UpdateSketch(range=(d @ omega).to(dtype), corange=(psi @ d).to(dtype))


def low_rank_from_sketch(sketch: UpdateSketch, psi: torch.Tensor, rank: int,
                         *, scaling: float = 1.0) -> LoraSBFactors:
    """LoRA-SB factors from a single-pass sketch (Tropp et al. 2017: low-rank, then fixed-rank).

    Q = orth(Y); X = (Ψ·Q)⁺·W; the SVD X = Ũ Σ Vᵀ gives ΔW ≈ (Q·Ũ) Σ Vᵀ, truncated to
    ``rank``. Exact (up to rounding) when rank ΔW ≤ k. On sign-like updates the co-range
    solve costs accuracy (residual 1.4–1.55× the optimal one, measured; see the module
    docstring); the two-pass protocol (:func:`orthonormal_basis`, :func:`factors_from_projection`)
    is 1.14–1.16×.
    """
    q = orthonormal_basis(sketch.range)
    x = torch.linalg.lstsq(psi.to(torch.float64) @ q, sketch.corange.to(torch.float64), driver="gelsd").solution
    u_x, s, vh = torch.linalg.svd(x, full_matrices=False)
    return _factors(q @ u_x, s, vh, rank, scaling)


def orthonormal_basis(y: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the columns of ``y`` (Householder QR, float64)."""
    q, _ = torch.linalg.qr(y.to(torch.float64))
    return q


def factors_from_projection(q: torch.Tensor, projected: torch.Tensor, rank: int,
                            *, scaling: float = 1.0) -> LoraSBFactors:
    """LoRA-SB factors of ΔW ≈ Q·(QᵀΔW): SVD of the k×n projection, B = Q·Ũ_r, R = Σ_r/s, A = V_rᵀ.

    The last pass of the randomized range finder (Halko, Martinsson, Tropp, "Finding
    Structure with Randomness", SIAM Review 2011, Algs. 4.1/4.4 and 5.1): exact when
    range(ΔW) ⊆ range(Q).
    """
    u, s, vh = torch.linalg.svd(projected.to(torch.float64), full_matrices=False)
    return _factors(q.to(torch.float64) @ u, s, vh, rank, scaling)


def client_sketch(delta_w: torch.Tensor, stage: str, *, module: str, rank: int, seed: int,
                  basis: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What one client uploads for one module in one init pass, by wire name.

    ``"single"``: ΔW·Ω and Ψ·ΔW (one pass). ``"range"``: ΔW·basis, with Ω when no basis is
    given (m×k). ``"corange"``: basisᵀ·ΔW with the server's Q (k×n). ``"dense"``: ΔW.
    """
    d = delta_w.detach().to(torch.float64).cpu()
    if stage == "dense":
        return {module + DENSE_ESTIMATE: d.to(dtype)}
    if stage == "single":
        sketch = sketch_update(d, module=module, rank=rank, seed=seed, dtype=dtype)
        return {module + SKETCH_RANGE: sketch.range, module + SKETCH_CORANGE: sketch.corange}
    if stage == "range":
        omega = basis if basis is not None else sketch_matrices(module, *d.shape, rank, seed)[0]
        return {module + SKETCH_RANGE: (d @ omega.to(torch.float64)).to(dtype)}
    if stage == "corange":
        if basis is None:
            raise ValueError(f"{module}: the corange pass needs the server's basis Q ({module + SKETCH_BASIS})")
        return {module + SKETCH_CORANGE: (basis.to(torch.float64).T @ d).to(dtype)}
    raise ValueError(f"init stage {stage!r} is not one of {INIT_STAGES}")


def sketch_bytes(m: int, n: int, rank: int, *, passes: int = 2, bytes_per_number: int = 4) -> dict[str, int]:
    """Bytes of the LoRA-SB exchange for one adapted m×n matrix, per client.

    ``init_upload`` / ``init_download``: the whole initialisation with ``passes`` = 1
    (single-pass sketch) or 2 + 2q (range finder with q power iterations), including B and A
    sent once; ``init_upload_dense``: ΔW itself; ``round_upload`` / ``round_download``: R,
    every round. With k = 2r + 1 and l = 2k + 1:

    * passes = 1: up (k·m + l·n), down r·(m+n);
    * passes = 2 + 2q: up (1+q)·k·(m+n), down (1+q)·k·m + q·k·n + r·(m+n).

    E.g. m = n = 384, r = 8 (MiniLM): dense 589,824 B; single 79,872 B; two-pass 52,224 B up.
    m = n = 4096, r = 16: dense 67,108,864 B; two-pass 1,081,344 B up.
    """
    if not (passes == 1 or (passes >= 2 and passes % 2 == 0)):
        raise ValueError(f"passes={passes} must be 1 (single-pass) or even (2 + 2·power iterations)")
    k, l = sketch_dims(m, n, rank)
    factors = rank * (m + n)
    if passes == 1:
        up, down = k * m + l * n, factors
    else:
        q = (passes - 2) // 2
        up, down = (1 + q) * k * (m + n), (1 + q) * k * m + q * k * n + factors
    b = bytes_per_number
    return {"init_upload": b * up, "init_download": b * down, "init_upload_dense": b * m * n,
            "round_upload": b * rank * rank, "round_download": b * rank * rank}


# --------------------------------------------------------------------------- the init round, client side


def parse_init_reply(arrays: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Reply tensors by module and part (``"range"``, ``"corange"``, ``"dense"``)."""
    suffixes = {SKETCH_RANGE: "range", SKETCH_CORANGE: "corange", DENSE_ESTIMATE: "dense"}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in arrays.items():
        suffix = next((s for s in suffixes if key.endswith(s)), None)
        if suffix is None:
            raise KeyError(f"{key!r} is not a LoRA-SB init tensor (<module>{SKETCH_RANGE}, {SKETCH_CORANGE} "
                           f"or {DENSE_ESTIMATE})")
        out.setdefault(key[: -len(suffix)], {})[suffixes[suffix]] = value
    return out


def init_reply(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], config: Mapping[str, Any],
               arrays: Mapping[str, torch.Tensor] | None = None, *, learning_rate: float,
               adapter_name: str = "default", clip_norm: float | None = None, noise_multiplier: float = 0.0,
               generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """What a client sends back in an init pass: its sketches (or estimates) and metrics.

    ``config`` holds the strategy's ``CFG_*`` settings (without the glue's prefix); ``arrays``
    the server's bases (``<module>.sketch_basis``) for the range/corange passes. Every pass
    recomputes ΔW_k, so the client must use the same examples in every pass (and, with
    ``noise_multiplier``, a generator seeded the same way, so that all passes are
    post-processing of one noisy estimate).
    """
    rate = float(config.get(CFG_INIT_LEARNING_RATE, learning_rate))
    estimates = estimate_update(model, batches, learning_rate=rate, adapter_name=adapter_name,
                                estimator=str(config.get(CFG_INIT_ESTIMATOR, "adam")),
                                max_examples=int(config[CFG_INIT_SAMPLES]) if CFG_INIT_SAMPLES in config else None,
                                clip_norm=clip_norm, noise_multiplier=noise_multiplier, generator=generator)
    seed, rank, stage = int(config[CFG_INIT_SEED]), int(config[CFG_INIT_RANK]), str(config[CFG_INIT_STAGE])
    bases = arrays or {}
    out: dict[str, torch.Tensor] = {}
    for module, delta in estimates.items():
        out.update(client_sketch(delta, stage, module=module, rank=rank, seed=seed,
                                 basis=bases.get(module + SKETCH_BASIS)))
    metrics = {METRIC_SKETCH_FINGERPRINT: sketch_fingerprint(seed)}
    if CFG_ROUND in config:
        metrics[METRIC_ROUND] = float(config[CFG_ROUND])
    return out, metrics


__all__ = [
    "LORA_R",
    "LORA_SB_INIT_MODE",
    "LORA_SB_MODE",
    "LoraSBFactors",
    "LoraSBVariant",
    "UpdateSketch",
    "adopt_frozen",
    "attach_r",
    "canonical_signs",
    "client_sketch",
    "estimate_update",
    "factors_from_projection",
    "fold_r_into_a",
    "init_from_update",
    "init_reply",
    "lora_layers",
    "low_rank_from_sketch",
    "orthonormal_basis",
    "parse_init_reply",
    "prepare_handle",
    "r_identity",
    "sketch_bytes",
    "sketch_dims",
    "sketch_fingerprint",
    "sketch_matrices",
    "sketch_update",
]
