"""Example-level differential privacy on the client: DP-SGD steps and an RDP accountant.

DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016): every
example's gradient g_i (all trained tensors together) is clipped to norm C, the clipped
gradients are summed, Gaussian noise N(0, σ²C²I) is added, and the sum is divided by the
(expected) batch size L:

    g̃ = (Σ_i g_i · min(1, C/‖g_i‖) + N(0, σ²C²I)) / L.

Fed-SB's private variant (Singhal et al. 2025, arXiv:2502.15436, its private experiments and the DP scripts of
github.com/CERT-Lab/fed-sb, which run Opacus on the client) applies this to R (and the task
head) only: r² numbers per adapted matrix, so per-example gradients are cheap to hold, and
the noise reaches ΔW = s·B·(R + ξ)·A linearly. The guarantee is per client, over that
client's examples; what the server does with the replies is post-processing.

Privacy accounting is Rényi DP of the Poisson-subsampled Gaussian mechanism (Mironov,
Talwar, Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism",
arXiv:1908.10530, §3.3), composed over steps by adding RDP, and converted to (ε, δ) with
Balle et al., "Hypothesis Testing Interpretations and Rényi Differential Privacy",
AISTATS 2020, Thm. 21 — the analysis of Opacus' ``RDPAccountant``, on the same orders.
Opacus itself is not used: opacus 1.6.0 installed with ``--no-deps`` does not import
(it needs SciPy and opt-einsum, which this environment does not have). The tests check this
implementation against the values Opacus' own tests assert.

Caveats. Subsampling amplification assumes Poisson sampling (:func:`poisson_batch`): each
example joins a batch independently with probability q; fixed-size shuffled batches are
not covered by this analysis. ``torch.Generator`` is a Mersenne Twister, not a
cryptographically secure source: fine for research, not for a deployment that must
resist an adversary who can predict the noise (Opacus' ``secure_mode`` uses a CSPRNG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

# Opacus' RDPAccountant.DEFAULT_ALPHAS: 1.1, 1.2, ..., 10.9, then 12, ..., 63.
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))

PerExampleLoss = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]
METHODS = ("loop", "vmap")


# --------------------------------------------------------------------------- per-example gradients


def per_example_gradients(params: Mapping[str, torch.Tensor], per_example_loss_fn: PerExampleLoss,
                          batch: Mapping[str, torch.Tensor], *, method: str = "loop") -> dict[str, torch.Tensor]:
    """The gradient of each example's loss with respect to ``params``, stacked on a new first axis.

    Parameters
    ----------
    params : dict of str to Tensor
        The tensors to differentiate (their values; they are not modified).
    per_example_loss_fn : callable
        ``fn(params, example) -> scalar loss`` for one example: ``example`` is ``batch``
        indexed at one position (no batch dimension). See :func:`model_loss_fn`.
    batch : dict of str to Tensor
        Inputs with the batch dimension first.
    method : {"loop", "vmap"}
        ``"loop"``: one backward pass per example (works for any model).
        ``"vmap"``: ``torch.func.vmap(torch.func.grad(fn))``, one batched pass; needs a loss
        free of data-dependent Python control flow (Hugging Face BERT is not: its attention
        mask handling calls ``.item()``).

    Returns
    -------
    dict of str to Tensor
        Per name, a tensor of shape ``(batch_size, *param.shape)``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    detached = {k: v.detach() for k, v in params.items()}
    if method == "vmap":
        return dict(torch.func.vmap(torch.func.grad(per_example_loss_fn), in_dims=(None, 0))(detached, dict(batch)))
    size = int(next(iter(batch.values())).shape[0])
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in detached}
    for i in range(size):
        leaves = {k: v.clone().requires_grad_(True) for k, v in detached.items()}
        with torch.enable_grad():
            loss = per_example_loss_fn(leaves, {k: v[i] for k, v in batch.items()})
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (k, leaf), g in zip(leaves.items(), grads):
            rows[k].append(torch.zeros_like(leaf) if g is None else g)
    return {k: torch.stack(v) for k, v in rows.items()}


def model_loss_fn(model: torch.nn.Module) -> PerExampleLoss:
    """``fn(params, example)`` for a model whose output has ``.loss``; ``params`` keyed by parameter name.

    The example gets a batch dimension of 1 and is passed as keyword arguments through
    ``torch.func.functional_call`` (parameters not in ``params`` keep their values).
    """
    def loss(params: Mapping[str, torch.Tensor], example: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.unsqueeze(0) for k, v in example.items()}
        return torch.func.functional_call(model, dict(params), args=(), kwargs=inputs).loss

    return loss


def clip_per_example(per_example: Mapping[str, torch.Tensor],
                     clip_norm: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each example's gradient (all tensors together) to norm at most ``clip_norm``.

    Returns the clipped per-example gradients (float64) and each example's norm before
    clipping (float64, shape ``(batch_size,)``).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm={clip_norm} must be positive")
    flat = {k: v.detach().to(torch.float64) for k, v in per_example.items()}
    squares = sum(v.reshape(v.shape[0], -1).pow(2).sum(dim=1) for v in flat.values())
    norms = torch.sqrt(squares)
    factors = torch.clamp(clip_norm / torch.clamp(norms, min=1e-300), max=1.0)
    clipped = {k: v * factors.reshape(-1, *([1] * (v.dim() - 1))) for k, v in flat.items()}
    return clipped, norms


def dp_step(params: Mapping[str, torch.Tensor], per_example_loss_fn: PerExampleLoss,
            batch: Mapping[str, torch.Tensor], clip_norm: float, noise_multiplier: float,
            generator: torch.Generator | None, *, expected_batch_size: int | None = None,
            method: str = "loop") -> dict[str, torch.Tensor]:
    """One DP-SGD gradient: clip each example's gradient, sum, add Gaussian noise, average.

    Parameters
    ----------
    params : dict of str to Tensor
        The trained tensors (e.g. every R and the task head), by name.
    per_example_loss_fn : callable
        ``fn(params, example) -> scalar``, see :func:`per_example_gradients`.
    batch : dict of str to Tensor
        A Poisson-sampled batch (:func:`poisson_batch`), batch dimension first; may be empty
        only if ``expected_batch_size`` is given (the step is then noise alone).
    clip_norm : float
        C, the per-example L2 bound over all tensors together.
    noise_multiplier : float
        σ; the noise added to the sum has standard deviation σ·C per coordinate.
    generator : torch.Generator or None
        The noise source (CPU); None uses torch's global generator.
    expected_batch_size : int, optional
        L = q·N to divide by; by default the actual batch size. With Poisson sampling pass
        the expected size (as Opacus does), so the normalisation reveals nothing.
    method : {"loop", "vmap"}
        How per-example gradients are computed.

    Returns
    -------
    dict of str to Tensor
        The privatized gradient per name, in each parameter's dtype and device: set it as
        ``.grad`` and take an optimizer step.
    """
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be non-negative (0 disables the noise)")
    size = int(next(iter(batch.values())).shape[0]) if batch else 0
    divisor = expected_batch_size if expected_batch_size is not None else size
    if divisor <= 0:
        raise ValueError(f"cannot average over {divisor} examples; pass expected_batch_size for an empty batch")
    if size > 0:
        clipped, _ = clip_per_example(per_example_gradients(params, per_example_loss_fn, batch, method=method),
                                      clip_norm)
        sums = {k: v.sum(dim=0) for k, v in clipped.items()}
    else:
        sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in params.items()}
    out = {}
    for key, total in sums.items():
        noise = torch.randn(total.shape, generator=generator, dtype=torch.float64) * (noise_multiplier * clip_norm)
        ref = params[key]
        out[key] = ((total.cpu() + noise) / divisor).to(device=ref.device, dtype=ref.dtype)
    return out


def poisson_batch(num_examples: int, sample_rate: float, generator: torch.Generator | None) -> torch.Tensor:
    """Indices of one Poisson-sampled batch: each example independently with probability q."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate} must be in (0, 1] (expected batch size / examples)")
    return torch.nonzero(torch.rand(num_examples, generator=generator) < sample_rate).flatten()


# --------------------------------------------------------------------------- RDP of the sampled Gaussian


def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    return hi if lo == -math.inf else hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """log(e^a − e^b) for a ≥ b."""
    if a < b:
        raise ValueError(f"log-space subtraction would be negative ({a} < {b})")
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    try:
        return math.log(math.expm1(a - b)) + b
    except OverflowError:
        return a


def _log_erfc(x: float) -> float:
    """log(erfc(x)), accurate in the far tail (erfc(x) = 2·Φ(−x·√2))."""
    return math.log(2.0) + float(torch.special.log_ndtr(torch.tensor(-x * math.sqrt(2.0), dtype=torch.float64)))


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_α = log Σ_{i=0..α} C(α,i) q^i (1−q)^(α−i) exp((i²−i)/(2σ²)) (Mironov et al. 2019, §3.3)."""
    log_a = -math.inf
    for i in range(alpha + 1):
        term = (math.log(math.comb(alpha, i)) + i * math.log(q) + (alpha - i) * math.log1p(-q)
                + (i * i - i) / (2 * sigma ** 2))
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_fractional(q: float, sigma: float, alpha: float, max_terms: int = 100_000) -> float:
    """log A_α for fractional α: the two tail series of Mironov et al. (2019), §3.3."""
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma ** 2 * math.log(1 / q - 1) + 0.5
    log_abs_coef, coef_sign = 0.0, 1.0  # generalized binomial C(α, i), built term by term
    for i in range(max_terms):
        if i > 0:
            factor = (alpha - i + 1) / i
            log_abs_coef += math.log(abs(factor))
            coef_sign *= math.copysign(1.0, factor)
        j = alpha - i
        log_t0 = log_abs_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_abs_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma ** 2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma ** 2) + log_e1
        if coef_sign > 0:
            log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        else:
            log_a0, log_a1 = _log_sub(log_a0, log_s0), _log_sub(log_a1, log_s1)
        if max(log_s0, log_s1) < -30:
            return _log_add(log_a0, log_a1)
    raise ArithmeticError(f"RDP series for alpha={alpha}, q={q}, sigma={sigma} did not converge in {max_terms} terms")


def rdp_sampled_gaussian(sample_rate: float, noise_multiplier: float,
                         orders: Sequence[float] = DEFAULT_ORDERS) -> list[float]:
    """RDP ε(α) of one step of the Poisson-subsampled Gaussian mechanism, per order α.

    Parameters
    ----------
    sample_rate : float
        q in [0, 1].
    noise_multiplier : float
        σ (noise standard deviation / sensitivity); 0 means no privacy (infinite ε).
    orders : sequence of float
        Rényi orders α > 1.
    """
    if not 0 <= sample_rate <= 1:
        raise ValueError(f"sample_rate={sample_rate} must be in [0, 1]")
    if noise_multiplier < 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be non-negative")
    out = []
    for alpha in orders:
        if alpha <= 1:
            raise ValueError(f"Rényi order {alpha} must be greater than 1")
        if sample_rate == 0:
            out.append(0.0)
        elif noise_multiplier == 0 or math.isinf(alpha):
            out.append(math.inf)
        elif sample_rate == 1:
            out.append(alpha / (2 * noise_multiplier ** 2))
        elif float(alpha).is_integer():
            out.append(_log_a_integer(sample_rate, noise_multiplier, int(alpha)) / (alpha - 1))
        else:
            out.append(_log_a_fractional(sample_rate, noise_multiplier, alpha) / (alpha - 1))
    return out


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    """(ε, best α) from RDP: ε = min_α rdp(α) + log((α−1)/α) − (log δ + log α)/(α−1) (Balle et al. 2020)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta} must be in (0, 1), e.g. 1e-5 or below 1/examples")
    best = (math.inf, math.nan)
    for alpha, value in zip(orders, rdp):
        eps = value + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        if eps < best[0]:
            best = (eps, float(alpha))
    return max(best[0], 0.0), best[1]


@dataclass
class PrivacyLedger:
    """Running (ε, δ) of one client's DP-SGD steps, by RDP composition.

    Parameters
    ----------
    noise_multiplier : float
        σ of the steps recorded by :meth:`step` (unless given there).
    sample_rate : float
        q, the Poisson sampling rate of those steps (expected batch size / examples).
    delta : float
        δ of the reported ε.
    orders : tuple of float
        Rényi orders searched for the best conversion.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    orders: tuple[float, ...] = DEFAULT_ORDERS
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        rdp_sampled_gaussian(self.sample_rate, self.noise_multiplier, self.orders[:1])  # validates
        if not 0 < self.delta < 1:
            raise ValueError(f"delta={self.delta} must be in (0, 1)")

    def step(self, num_steps: int = 1, *, noise_multiplier: float | None = None,
             sample_rate: float | None = None) -> PrivacyLedger:
        """Record ``num_steps`` steps (another σ or q for, e.g., a one-off step on all data)."""
        if num_steps < 0:
            raise ValueError(f"num_steps={num_steps} must be non-negative")
        sigma = self.noise_multiplier if noise_multiplier is None else noise_multiplier
        q = self.sample_rate if sample_rate is None else sample_rate
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + num_steps)
        elif num_steps:
            self.history.append((sigma, q, num_steps))
        return self

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def rdp(self) -> list[float]:
        """The composed RDP per order."""
        total = [0.0] * len(self.orders)
        for sigma, q, n in self.history:
            total = [t + n * r for t, r in zip(total, rdp_sampled_gaussian(q, sigma, self.orders))]
        return total

    def epsilon(self) -> float:
        """ε spent so far at the ledger's δ (0 before any step)."""
        if not self.history:
            return 0.0
        return epsilon_from_rdp(self.orders, self.rdp(), self.delta)[0]


def epsilon_for(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                orders: Sequence[float] = DEFAULT_ORDERS, *, full_batch_steps: int = 0) -> float:
    """ε after ``steps`` steps of one (σ, q) at δ, plus ``full_batch_steps`` steps at q = 1."""
    ledger = PrivacyLedger(noise_multiplier, sample_rate, delta, tuple(orders)).step(steps)
    if full_batch_steps:
        ledger.step(full_batch_steps, sample_rate=1.0)
    return ledger.epsilon()


def noise_multiplier_for(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                         *, full_batch_steps: int = 0, epsilon_tolerance: float = 0.01,
                         max_sigma: float = 1e6) -> float:
    """The noise multiplier σ for which ``steps`` steps spend at most ``target_epsilon`` (and within tolerance).

    ``full_batch_steps`` more steps at sampling rate 1 (no subsampling, e.g. Fed-SB's private
    initialisation estimate) are composed in: one such step costs far more than a sampled one.

    Doubles σ from 20 until ε(σ) ≤ target, then bisects until target − ε(σ) ≤
    ``epsilon_tolerance``; returns that σ (ε never exceeds the target). This is the search of
    Opacus' ``get_noise_multiplier``, so the same inputs give the same σ.
    """
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon={target_epsilon} must be positive")
    if steps < 1:
        raise ValueError(f"steps={steps} must be at least 1")
    low, high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        high *= 2
        if high > max_sigma:
            raise ValueError(f"target_epsilon={target_epsilon} at delta={delta} needs sigma > {max_sigma}; "
                             "raise the budget or lower the sampling rate or steps")
        eps_high = epsilon_for(high, sample_rate, steps, delta, full_batch_steps=full_batch_steps)
    while target_epsilon - eps_high > epsilon_tolerance:
        mid = (low + high) / 2
        eps = epsilon_for(mid, sample_rate, steps, delta, full_batch_steps=full_batch_steps)
        if eps < target_epsilon:
            high, eps_high = mid, eps
        else:
            low = mid
    return high


__all__ = [
    "DEFAULT_ORDERS",
    "PrivacyLedger",
    "clip_per_example",
    "dp_step",
    "epsilon_for",
    "epsilon_from_rdp",
    "model_loss_fn",
    "noise_multiplier_for",
    "per_example_gradients",
    "poisson_batch",
    "rdp_sampled_gaussian",
]
