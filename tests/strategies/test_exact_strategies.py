"""FLoRA, FFA-LoRA and LoRA-FAIR against the ideal update Σ_k p_k·s_k·B_k·A_k.

The ideal is computed here independently, in float64. Tolerance 1e-6 relative: the
strategies hand out float32 factors (rounding ~6e-8 relative per entry), well below it.
"""

from __future__ import annotations

import pytest
import torch
from fedtune.strategies import FedIT, FFALoRA, FLoRA, LoRAFAIR
from fedtune.strategies.flora.residual import Residual, residual_key, split_residual

from fedtune.config import load_config
from fedtune.errors import AggregationError, ConfigError, InvalidUpdateError
from fedtune.strategy import AdapterSpec, ClientUpdate

M, N = 12, 10
MODULES = ("layer0.q", "layer1.v")
TOL = 1e-6


def adapter(rank: int, gen: torch.Generator, b_scale: float = 0.1) -> dict[str, torch.Tensor]:
    out = {"head.weight": torch.randn(3, 4, generator=gen)}
    for m in MODULES:
        out[f"{m}.lora_A.weight"] = torch.randn(rank, N, generator=gen)
        out[f"{m}.lora_B.weight"] = torch.randn(M, rank, generator=gen) * b_scale
    return out


def spec(rank: int = 4, alpha: float = 8.0, seed: int = 0) -> AdapterSpec:
    gen = torch.Generator().manual_seed(seed)
    initial = adapter(rank, gen)
    for m in MODULES:
        initial[f"{m}.lora_B.weight"] = torch.zeros(M, rank)
    return AdapterSpec(initial=initial, rank=rank, alpha=alpha, seed=seed)


def updates(ranks, weights, alpha=8.0, seed=1, base=None):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, (r, w) in enumerate(zip(ranks, weights)):
        arrays = adapter(r, gen)
        if base is not None:  # FFA-LoRA clients keep the shared A and send no A
            arrays = {k: v for k, v in arrays.items() if "lora_A" not in k}
        out.append(ClientUpdate(node_id=i, arrays=arrays, num_examples=w, metrics={"lora_scaling": alpha / r}))
    return out


def ideal(ups, shared=None) -> dict[str, torch.Tensor]:
    total = sum(u.num_examples for u in ups)
    out = {}
    for m in MODULES:
        acc = torch.zeros(M, N, dtype=torch.float64)
        for u in ups:
            a = (shared or u.arrays)[f"{m}.lora_A.weight"].double()
            acc += (u.num_examples / total) * u.metrics["lora_scaling"] * (u.arrays[f"{m}.lora_B.weight"].double() @ a)
        out[m] = acc
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def merged(strategy: FLoRA) -> dict[str, torch.Tensor]:
    """FLoRA's merged update so far as dense float64 matrices (Σ over rounds of B·A)."""
    out: dict[str, torch.Tensor] = {}
    for stack in strategy.merged_rounds().values():
        for m, (a, b) in stack.items():
            out[m] = out.get(m, 0) + b.double() @ a.double()
    return out


# --------------------------------------------------------------------------- FLoRA


@pytest.mark.parametrize("ranks,weights", [([2, 4, 8], [30, 10, 60]), ([4, 16, 8, 1], [1, 1, 5, 2]), ([8], [7])])
def test_flora_merged_update_equals_the_ideal(ranks, weights) -> None:
    strategy = FLoRA()
    strategy.initialize(spec())
    ups = updates(ranks, weights)
    metrics = strategy.aggregate(1, ups)
    assert list(strategy.merged_rounds()) == [1]
    residual = merged(strategy)
    want = ideal(ups)
    for m in MODULES:
        assert rel(residual[m], want[m]) <= TOL
    assert metrics["aggregation_error"] <= TOL
    assert metrics["stacked_rank"] == sum(ranks)


def test_flora_stacks_have_the_summed_rank_and_fold_in_the_scaling() -> None:
    strategy = FLoRA()
    strategy.initialize(spec())
    ups = updates([2, 6], [1, 3], alpha=12.0)
    strategy.aggregate(1, ups)
    arrays = strategy.configure_client(2, node_id=0).arrays
    _, rounds = split_residual(arrays)
    a, b = rounds[1]["layer0.q"]
    assert a.shape == (8, N) and b.shape == (M, 8)
    # Rows of client 0: p_0 · s_0 · A_0 = 0.25 · (12 / 2) · A_0
    assert torch.allclose(a[:2], 0.25 * 6.0 * ups[0].arrays["layer0.q.lora_A.weight"], rtol=1e-6)
    assert torch.equal(b[:, 2:], ups[1].arrays["layer0.q.lora_B.weight"])


def test_flora_zero_weight_client_contributes_nothing() -> None:
    with_zero, without = FLoRA(), FLoRA()
    for s in (with_zero, without):
        s.initialize(spec())
    ups = updates([2, 4, 8], [5, 0, 3])
    with_zero.aggregate(1, ups)
    without.aggregate(1, [ups[0], ups[2]])
    for m in MODULES:
        assert rel(merged(with_zero)[m], merged(without)[m]) <= TOL


def test_flora_rejects_mismatched_factors_and_missing_modules() -> None:
    strategy = FLoRA()
    strategy.initialize(spec())
    ups = updates([2, 4], [1, 1])
    broken = dict(ups[1].arrays)
    broken["layer0.q.lora_B.weight"] = torch.zeros(M, 3)  # rank 3 B with a rank 4 A
    with pytest.raises(AggregationError, match="differ in rank"):
        strategy.aggregate(1, [ups[0], ClientUpdate(1, broken, 1, {"lora_scaling": 2.0})])
    missing = {k: v for k, v in ups[1].arrays.items() if not k.startswith("layer1.v")}
    with pytest.raises(AggregationError, match="layer1.v"):
        strategy.aggregate(1, [ups[0], ClientUpdate(1, missing, 1, {"lora_scaling": 2.0})])


def test_flora_accumulates_rounds_and_a_late_client_catches_up() -> None:
    strategy = FLoRA()
    strategy.initialize(spec())
    strategy.configure_client(1, node_id=0)
    first = updates([2, 4], [1, 1], seed=1)
    strategy.aggregate(1, first)
    strategy.configure_client(2, node_id=0)
    second = updates([4, 2], [2, 1], seed=2)
    strategy.aggregate(2, second)
    total = {m: ideal(first)[m] + ideal(second)[m] for m in MODULES}
    for m in MODULES:
        assert rel(merged(strategy)[m], total[m]) <= TOL

    # Client 7 never trained: it gets both merges; applied to an empty residual they give the total.
    late = strategy.configure_client(3, node_id=7).arrays
    _, rounds = split_residual(late)
    assert sorted(rounds) == [1, 2]
    model = torch.nn.ModuleDict({m.replace(".", "_"): torch.nn.Linear(N, M, bias=False) for m in MODULES})
    residual = Residual(model)
    renamed = {v: {m.replace(".", "_"): f for m, f in mods.items()} for v, mods in rounds.items()}
    assert residual.merge_rounds(renamed) == [1, 2]
    for m in MODULES:
        assert rel(residual.deltas[m.replace(".", "_")].to_dense(), total[m]) <= TOL


def test_flora_download_grows_with_clients() -> None:
    strategy = FLoRA()
    strategy.initialize(spec())
    strategy.configure_client(1, node_id=0)
    strategy.aggregate(1, updates([4] * 5, [1] * 5))
    arrays = strategy.configure_client(2, node_id=0).arrays
    factors = sum(v.numel() for k, v in arrays.items() if k.startswith("residual."))
    assert factors == len(MODULES) * 5 * 4 * (M + N)  # Σ_k r_k · (m + n) per matrix


# --------------------------------------------------------------------------- residual


def test_residual_hook_equals_merging_into_the_weight() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(N, M)
    model = torch.nn.ModuleDict({"lin": layer})
    x = torch.randn(5, N)
    a, b = torch.randn(2, N), torch.randn(M, 2) * 1e-3
    expected = torch.nn.functional.linear(x, layer.weight + b @ a, layer.bias)
    residual = Residual(model)
    residual.add("lin", a, b)
    assert torch.allclose(model["lin"](x), expected, atol=1e-6)
    residual.clear()
    assert torch.equal(model["lin"](x), layer(x))


def test_residual_holds_factors_below_the_break_even_rank_then_the_dense_update() -> None:
    """4·min(R·(m + n), m·n) bytes per layer, and the same ΔW (to float32 rounding) either way."""
    m, n = 12, 10  # break-even rank: R·22 < 120 holds up to R = 5
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(n, m)})
    residual = Residual(model)
    gen = torch.Generator().manual_seed(3)
    total = torch.zeros(m, n, dtype=torch.float64)
    x = torch.randn(4, n, generator=gen)
    for rank, held in [(2, 2 * (m + n)), (3, 5 * (m + n)), (1, m * n), (4, m * n)]:
        a, b = torch.randn(rank, n, generator=gen), torch.randn(m, rank, generator=gen)
        residual.add("lin", a, b)
        total += b.double() @ a.double()
        delta = residual.deltas["lin"]
        assert residual.nbytes == 4 * held
        assert (delta.dense is None) == (held < m * n)
        assert rel(delta.to_dense(), total) <= TOL
        with torch.no_grad():
            beside = model["lin"](x) - torch.nn.functional.linear(x, model["lin"].weight, model["lin"].bias)
        torch.testing.assert_close(beside.double(), x.double() @ total.T, rtol=0, atol=1e-5)
    with pytest.raises(InvalidUpdateError, match="do not give a 12×10 update"):
        residual.add("lin", torch.randn(2, n + 1), torch.randn(m, 2))


def test_residual_refuses_a_gap_and_skips_merged_rounds() -> None:
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(N, M)})
    residual = Residual(model)
    pair = (torch.randn(2, N), torch.randn(M, 2))
    assert residual.merge_rounds({1: {"lin": pair}}) == [1]
    assert residual.merge_rounds({1: {"lin": pair}, 2: {"lin": pair}}) == [2]
    with pytest.raises(Exception, match="jumps from round 2 to 4"):
        residual.merge_rounds({4: {"lin": pair}})
    assert residual_key(3, "lin", "A") == "residual.3.lin.lora_A.weight"


# --------------------------------------------------------------------------- FFA-LoRA


def test_ffa_lora_is_exact_and_never_sends_a() -> None:
    s = spec()
    strategy = FFALoRA()
    strategy.initialize(s)
    instruction = strategy.configure_client(1, node_id=0)
    assert not any("lora_A" in k for k in instruction.arrays)
    assert not any("lora_A" in k for k in instruction.expects)
    assert instruction.options["frozen_digest"]
    ups = updates([4, 4, 4], [3, 1, 2], base=s.initial)
    shared = {k: v for k, v in s.initial.items() if "lora_A" in k}
    metrics = strategy.aggregate(1, ups)
    g = strategy.global_adapter()
    want = ideal(ups, shared=shared)
    for m in MODULES:
        got = 2.0 * g[f"{m}.lora_B.weight"].double() @ g[f"{m}.lora_A.weight"].double()
        assert rel(got, want[m]) <= TOL
        assert torch.equal(g[f"{m}.lora_A.weight"], s.initial[f"{m}.lora_A.weight"])
    assert metrics["aggregation_error"] <= TOL


# --------------------------------------------------------------------------- LoRA-FAIR


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_lora_fair_is_strictly_closer_to_the_ideal_than_fedit(seed: int) -> None:
    fair, fedit = LoRAFAIR(), FedIT()
    for s in (fair, fedit):
        s.initialize(spec())
    ups = updates([4, 4, 4, 4], [10, 20, 30, 40], seed=seed)
    metrics = fair.aggregate(1, ups)
    fedit_metrics = fedit.aggregate(1, ups)
    assert metrics["fedit_aggregation_error"] == pytest.approx(fedit_metrics["aggregation_error"], rel=1e-9)
    assert metrics["aggregation_error"] < metrics["fedit_aggregation_error"]
    assert metrics["cosine_distance"] < metrics["fedit_cosine_distance"]
    assert 0 < metrics["error_removed"] < 1
    # A and the head are FedIT's averages; only B moves.
    for key, value in fedit.global_adapter().items():
        if "lora_B" not in key:
            assert torch.equal(fair.global_adapter()[key], value)


def test_lora_fair_with_one_client_changes_nothing() -> None:
    fair = LoRAFAIR()
    fair.initialize(spec())
    ups = updates([4], [5])
    metrics = fair.aggregate(1, ups)
    assert metrics["fedit_aggregation_error"] <= TOL and metrics["aggregation_error"] <= TOL
    for key, value in ups[0].arrays.items():
        assert torch.equal(fair.global_adapter()[key], value)


def test_lora_fair_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="lam=-1"):
        LoRAFAIR(lam=-1)
    with pytest.raises(ValueError, match="steps=0"):
        LoRAFAIR(steps=0)


# --------------------------------------------------------------------------- configuration


def test_mixed_ranks_need_a_strategy_that_accepts_them() -> None:
    with pytest.raises(ConfigError) as excinfo:
        load_config(None, ["adapter.client_ranks=[4,8,16]", "strategy.name=fedit"])
    assert "adapter.client_ranks=[4, 8, 16]" in str(excinfo.value) and "flora" in str(excinfo.value)
    cfg = load_config(None, ["adapter.client_ranks=[4,8,16]", "strategy.name=flora"])
    assert [cfg.adapter.rank_for(i) for i in range(4)] == [4, 8, 16, 4]


def test_a_new_run_in_the_same_process_starts_from_an_empty_residual() -> None:
    model = torch.nn.ModuleDict({"lin": torch.nn.Linear(N, M)})
    residual = Residual(model)
    residual.claim(run := 101)
    residual.merge_rounds({1: {"lin": (torch.randn(2, N), torch.randn(M, 2))}})
    residual.claim(run)  # same run: keeps its merges
    assert residual.version == 1 and "lin" in residual.deltas
    residual.claim(202)  # next run: round 1 must be merged again, not skipped
    assert residual.version == 0 and not residual.deltas


def test_flora_stack_error_from_the_factors_equals_the_dense_error() -> None:
    from fedtune.strategies.aggregation import ideal_terms, stack_factors
    from fedtune.strategies.flora.strategy import stack_error

    from tests.strategies.dense_reference import ideal_updates, relative_error

    lora = [{k: v for k, v in u.arrays.items() if "lora_" in k} for u in updates([2, 4, 3], [1, 2, 3])]
    weights, scalings = [1.0, 2.0, 3.0], [4.0, 2.0, 8.0 / 3.0]
    ideal = ideal_updates(lora, weights, scalings)
    for perturb in (0.0, 1e-3):  # the stack as built (float32 rounding only), then with its B changed
        stack = stack_factors(lora, weights, scalings)
        stack = {m: (a, b + perturb * torch.ones_like(b)) for m, (a, b) in stack.items()}
        dense = relative_error(ideal, {m: b.double() @ a.double() for m, (a, b) in stack.items()})
        got = stack_error(ideal_terms(lora, weights, scalings), stack)
        assert got == pytest.approx(dense, rel=1e-9, abs=1e-15)
        assert (got > 1e-4) == (perturb > 0)


def test_ffa_lora_error_through_the_shared_a_equals_the_dense_error() -> None:
    from fedtune.strategies.ffa_lora import shared_a_error

    from tests.strategies.dense_reference import ideal_updates, relative_error

    s = spec()
    frozen = {k: v for k, v in s.initial.items() if "lora_A" in k}
    clients = [u.arrays for u in updates([4, 4, 4], [3, 1, 2], base=s.initial)]
    averaged = {k: v + 1e-3 for k, v in clients[0].items()}  # a wrong average, so the error is visible
    dense = relative_error(ideal_updates([{**frozen, **c} for c in clients], [3, 1, 2], [1.0] * 3),
                           {m: averaged[f"{m}.lora_B.weight"].double() @ frozen[f"{m}.lora_A.weight"].double()
                            for m in MODULES})
    assert shared_a_error(clients, [3, 1, 2], averaged, frozen) == pytest.approx(dense, rel=1e-12)
