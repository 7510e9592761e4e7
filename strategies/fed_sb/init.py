"""LoRA-SB's initialisation from the first update: the estimate, its SVD, and its sketches.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from fedtune.strategies.fed_sb.keys import (
    CFG_INIT_ESTIMATOR,
    CFG_INIT_LEARNING_RATE,
    CFG_INIT_RANK,
    CFG_INIT_SAMPLES,
    CFG_INIT_SEED,
    CFG_INIT_STAGE,
    CFG_ROUND,
    DENSE_ESTIMATE,
    ESTIMATORS,
    INIT_STAGES,
    METRIC_ROUND,
    METRIC_SKETCH_FINGERPRINT,
    SKETCH_BASIS,
    SKETCH_CORANGE,
    SKETCH_RANGE,
)
from fedtune.strategies.fed_sb.layer import lora_layers
from peft.utils.other import transpose
from torch import nn

from fedtune.models.devices import device_of, to_device


class LoraSBFactors(NamedTuple):
    """The LoRA-SB factors of one adapted matrix: s·B·R·A with B m×r, R r×r, A r×n."""

    B: torch.Tensor
    R: torch.Tensor
    A: torch.Tensor


class UpdateSketch(NamedTuple):
    """A single-pass sketch of an m×n matrix ΔW: ``range`` = ΔW·Ω (m×k), ``corange`` = Ψ·ΔW (l×n)."""

    range: torch.Tensor
    corange: torch.Tensor



# --------------------------------------------------------------------------- first-update estimate


BatchLoss = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]


def _model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


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
    batch_loss: BatchLoss | None = None,
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
        before training).
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
    batch_loss : callable, optional
        ``batch_loss(model, batch)``: the mean loss of a batch (the client's objective, e.g.
        DPO's on preference pairs); by default ``model(**batch).loss``.

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
    totals, seen = _gradient_sum(model, weights, batches, max_examples, clip_norm, batch_loss or _model_loss)
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
                  clip_norm: float | None, batch_loss: BatchLoss) -> tuple[dict[str, torch.Tensor], int]:
    """Σ of per-example gradients (clipped jointly when ``clip_norm``), float64, and the count."""
    names, params = list(weights), list(weights.values())
    totals = {n: torch.zeros(w.shape, dtype=torch.float64) for n, w in weights.items()}
    saved = [p.requires_grad for p in params]
    was_training, seen = model.training, 0
    device = device_of(model)
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
                loss = batch_loss(model, to_device(part, device))
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
               generator: torch.Generator | None = None,
               batch_loss: BatchLoss | None = None) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
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
                                clip_norm=clip_norm, noise_multiplier=noise_multiplier, generator=generator,
                                batch_loss=batch_loss)
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
