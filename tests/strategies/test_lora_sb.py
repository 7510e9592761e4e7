"""LoRA-SB on PEFT: the forward, merge and export paths, the initialisation and the sketch.

Model tests use the tiny 2-layer, 32-wide BERT of ``conftest.tiny_bert`` with LoRA (r = 4,
α = 8, so s = 2) on ``query`` and ``value``. Tolerances: float32 forward comparisons 1e-5
absolute on logits of order 1 (a few float32 roundings of 32-term dot products, ~1e-6);
float64 linear algebra 1e-10 relative.
"""

from __future__ import annotations

import math

import pytest
import torch
from fedtune.strategies.fed_sb.init import (
    client_sketch,
    estimate_update,
    factors_from_projection,
    init_from_update,
    init_reply,
    low_rank_from_sketch,
    orthonormal_basis,
    parse_init_reply,
    sketch_bytes,
    sketch_dims,
    sketch_fingerprint,
    sketch_matrices,
    sketch_update,
)
from fedtune.strategies.fed_sb.keys import LORA_R
from fedtune.strategies.fed_sb.layer import (
    adopt_frozen,
    attach_r,
    fold_r_into_a,
    lora_layers,
    prepare_handle,
)
from peft import LoraConfig, PeftModel, TaskType, get_peft_model, set_peft_model_state_dict
from transformers import AutoModelForSequenceClassification

from fedtune.config import AdapterConfig, ModelConfig
from fedtune.models.loading import clear_model_cache, get_adapter

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
FORWARD_TOL = 1e-5


def lora_model(path: str, rank: int = RANK, alpha: float = ALPHA, **extra) -> PeftModel:
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4).eval()
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=["query", "value"], **extra)
    return get_peft_model(base, config).eval()


def inputs(seed: int = 0, batch: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 5000, (batch, length), generator=gen),
            "attention_mask": torch.ones(batch, length, dtype=torch.long),
            "labels": torch.randint(0, 4, (batch,), generator=gen)}


def wire_name(param_name: str) -> str:
    """A PEFT parameter name as AdapterHandle names it (and PEFT saves it)."""
    return param_name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


def randomize(model: PeftModel, seed: int = 1) -> None:
    """Random B, R and A (R only where attached), so every term of s·B·R·A matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for weight in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                weight.copy_(torch.randn(weight.shape, generator=gen) * 0.3)
            if hasattr(layer, "lora_R"):
                layer.lora_R["default"].weight.copy_(torch.randn(RANK, RANK, generator=gen))


# --------------------------------------------------------------------------- the PEFT layer


def test_lora_sb_layer_computes_w0x_plus_s_b_r_a_x(tiny_bert: str) -> None:
    model = lora_model(tiny_bert)
    attach_r(model, "default", RANK)
    randomize(model)
    name, layer = next(iter(lora_layers(model).items()))
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(2))
    base = layer.get_base_layer()
    b, a, r = layer.lora_B["default"].weight, layer.lora_A["default"].weight, layer.lora_R["default"].weight
    expected = x @ base.weight.T + base.bias + SCALE * (x @ a.T @ r.T @ b.T)
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(got, expected, atol=FORWARD_TOL, rtol=0)
    # Dropping R (plain LoRA) gives a different result: R is really on the path.
    assert (got - (x @ base.weight.T + base.bias + SCALE * (x @ a.T @ b.T))).abs().max() > 1e-2


def test_attaching_r_keeps_the_function_and_freezes_a_and_b(tiny_bert: str) -> None:
    model = lora_model(tiny_bert)
    randomize(model)
    x = inputs()
    with torch.no_grad():
        before = model(**x).logits
    params = attach_r(model, "default", RANK)
    with torch.no_grad():
        after = model(**x).logits
    assert torch.equal(before, after)  # R = I: identical, not merely close
    assert sorted(params) == sorted(m + LORA_R for m in lora_layers(model))
    model.set_adapter("default")  # PEFT re-enables adapter weights here; A and B must stay frozen
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_R" in n for n in trainable)
    assert not any("lora_A" in n or "lora_B" in n for n in trainable)
    assert attach_r(model, "default", RANK).keys() == params.keys()  # idempotent


def test_merge_and_unload_equals_the_unmerged_forward(tiny_bert: str) -> None:
    model = lora_model(tiny_bert)
    attach_r(model, "default", RANK)
    randomize(model)
    x = inputs()
    with torch.no_grad():
        unmerged = model(**x).logits
        model.merge_adapter()
        merged = model(**x).logits
        model.unmerge_adapter()
        again = model(**x).logits
        plain = model.merge_and_unload()(**x).logits
    torch.testing.assert_close(merged, unmerged, atol=FORWARD_TOL, rtol=0)
    torch.testing.assert_close(again, unmerged, atol=FORWARD_TOL, rtol=0)
    torch.testing.assert_close(plain, unmerged, atol=FORWARD_TOL, rtol=0)


def test_folding_r_gives_a_plain_peft_adapter_with_the_same_forward(tiny_bert: str, tmp_path) -> None:
    model = lora_model(tiny_bert)
    attach_r(model, "default", RANK)
    randomize(model)
    x = inputs()
    with torch.no_grad():
        expected = model(**x).logits
    tensors = {wire_name(n): p.detach().clone() for n, p in model.named_parameters() if ".default." in n}
    folded = fold_r_into_a(tensors)
    assert not any(k.endswith(LORA_R) for k in folded) and set(folded) == {k for k in tensors if "lora_R" not in k}
    plain = lora_model(tiny_bert)
    result = set_peft_model_state_dict(plain, folded)
    assert not result.unexpected_keys
    plain.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=4)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).logits, expected, atol=FORWARD_TOL, rtol=0)


def test_fold_is_pure_and_checks_shapes() -> None:
    a, r = torch.randn(3, 5, dtype=torch.float64), torch.randn(3, 3, dtype=torch.float64)
    tensors = {"m.lora_A.weight": a, "m.lora_R.weight": r, "m.lora_B.weight": torch.zeros(4, 3)}
    out = fold_r_into_a(tensors)
    torch.testing.assert_close(out["m.lora_A.weight"], r @ a, rtol=1e-12, atol=0)
    assert torch.equal(tensors["m.lora_A.weight"], a)  # input untouched
    with pytest.raises(ValueError, match="r×r"):
        fold_r_into_a({"m.lora_A.weight": a, "m.lora_R.weight": torch.eye(2)})
    with pytest.raises(KeyError, match="partner"):
        fold_r_into_a({"m.lora_R.weight": r})


def test_attach_r_refuses_dora_and_a_wrong_rank(tiny_bert: str) -> None:
    with pytest.raises(ValueError, match="rank 4, but rank=8"):
        attach_r(lora_model(tiny_bert), "default", 8)
    with pytest.raises(ValueError, match="DoRA"):
        attach_r(lora_model(tiny_bert, use_dora=True), "default", RANK)
    with pytest.raises(ValueError, match="adapter_name='other'"):
        attach_r(lora_model(tiny_bert), "other")


def test_handle_wiring_helpers_register_r_and_keep_adopted_factors(tiny_bert: str) -> None:
    clear_model_cache()
    try:
        handle = get_adapter(ModelConfig(name=tiny_bert), AdapterConfig(rank=RANK, alpha=12.0, dropout=0.0), 4, seed=0)
        names = prepare_handle(handle, RANK)
        assert names and all(n in handle.params for n in names)
        assert all(torch.equal(handle.initial[n], torch.eye(RANK)) for n in names)
        frozen = {k: torch.randn(v.shape) for k, v in handle.state().items() if "lora_A" in k or "lora_B" in k}
        assert adopt_frozen(handle, frozen) == sorted(frozen)
        r_values = {n: torch.randn(RANK, RANK) for n in names}
        handle.load(r_values)  # B and A not sent: they come back as the adopted values
        state = handle.state()
        assert all(torch.equal(state[k], v) for k, v in {**frozen, **r_values}.items())
        trained = handle.set_trainable([r"^(?!.*\.lora_[AB]\.weight$)"])
        assert set(names) <= set(trained)
        assert not any("lora_A" in k or "lora_B" in k for k in trained)
    finally:
        clear_model_cache()


# --------------------------------------------------------------------------- initialisation


def test_init_from_a_diagonal_update_is_its_hand_computed_truncation() -> None:
    delta = torch.zeros(6, 5, dtype=torch.float64)
    delta[0, 0], delta[1, 1], delta[2, 2], delta[3, 3] = 5.0, -3.0, 2.0, 1.0
    b, r, a = init_from_update(delta, 2, scaling=2.0)
    # Singular values 5 and 3; the −3 puts its sign into one singular vector.
    torch.testing.assert_close(r, torch.diag(torch.tensor([2.5, 1.5], dtype=torch.float64)), rtol=0, atol=1e-14)
    expected = torch.zeros(6, 5, dtype=torch.float64)
    expected[0, 0], expected[1, 1] = 5.0, -3.0
    torch.testing.assert_close(2.0 * b @ r @ a, expected, rtol=0, atol=1e-14)
    assert b[:, 0].abs().argmax() == 0 and b[0, 0] > 0 and b[1, 1] > 0  # canonical signs
    torch.testing.assert_close(b.T @ b, torch.eye(2, dtype=torch.float64), rtol=0, atol=1e-14)


def test_init_equals_the_truncated_svd_of_a_random_update() -> None:
    gen = torch.Generator().manual_seed(3)
    delta = torch.randn(20, 12, generator=gen, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    b, r, a = init_from_update(delta, 5, scaling=0.5)
    truncation = u[:, :5] @ torch.diag(s[:5]) @ vh[:5]
    torch.testing.assert_close(0.5 * b @ r @ a, truncation, rtol=0, atol=1e-12)
    error = torch.linalg.matrix_norm(delta - 0.5 * b @ r @ a)
    assert math.isclose(float(error), float(s[5:].pow(2).sum().sqrt()), rel_tol=1e-12)  # Eckart–Young


def test_init_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rank=7"):
        init_from_update(torch.zeros(4, 6), 7)
    with pytest.raises(ValueError, match="scaling"):
        init_from_update(torch.zeros(4, 6), 2, scaling=0.0)
    with pytest.raises(ValueError, match="NaN"):
        init_from_update(torch.full((4, 6), float("nan")), 2)


def test_estimate_update_is_the_sign_of_the_summed_base_gradient(tiny_bert: str) -> None:
    model = lora_model(tiny_bert)
    attach_r(model, "default", RANK)
    batches = [inputs(seed=s, batch=2) for s in range(3)]
    est = estimate_update(model, batches, learning_rate=1e-3)
    sgd = estimate_update(model, batches, learning_rate=1e-3, estimator="sgd")
    # By hand: Σ over batches of n_b · ∇ mean-loss, w.r.t. each target base weight.
    layers = lora_layers(model)
    weights = [layers[m].get_base_layer().weight for m in layers]
    for w in weights:
        w.requires_grad_(True)
    total = [torch.zeros_like(w, dtype=torch.float64) for w in weights]
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, weights)
        total = [t + 2 * g.double() for t, g in zip(total, grads)]
    for w in weights:
        w.requires_grad_(False)
    for module, t in zip(layers, total):
        assert torch.equal(est[module], (-1e-3 * torch.sign(t)).float())
        torch.testing.assert_close(sgd[module].double(), -1e-3 * t / 6, rtol=1e-5, atol=1e-12)
    assert not any(w.requires_grad for w in weights) and not model.training


def test_estimate_update_counts_examples_and_clips_each_one(tiny_bert: str) -> None:
    model = lora_model(tiny_bert)
    batches = [inputs(seed=s, batch=3) for s in range(2)]
    two_at_once = estimate_update(model, batches, learning_rate=1.0, estimator="sgd", max_examples=4)
    one_by_one = estimate_update(model, [inputs(seed=0, batch=3), {k: v[:1] for k, v in inputs(seed=1).items()}],
                                 learning_rate=1.0, estimator="sgd")
    for module in two_at_once:
        torch.testing.assert_close(two_at_once[module], one_by_one[module], rtol=1e-5, atol=1e-8)
    # Clipped: each example contributes at most C, so ‖Σ clipped‖/N ≤ C over all matrices.
    clipped = estimate_update(model, batches, learning_rate=1.0, estimator="sgd", clip_norm=1e-3)
    norm = math.sqrt(sum(float(d.double().pow(2).sum()) for d in clipped.values()))
    assert 0 < norm <= 1e-3 * (1 + 1e-6)


# --------------------------------------------------------------------------- the sketch


def low_rank(m: int, n: int, rank: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen,
                                                                                  dtype=torch.float64)


def test_sketch_recovers_a_low_rank_update_exactly() -> None:
    m, n, rank = 40, 30, 4
    delta = low_rank(m, n, 3, seed=5)  # rank 3 ≤ k: the sketch holds all of it
    _, psi = sketch_matrices("layer.q", m, n, rank, seed=11)
    exact = init_from_update(delta, rank, scaling=2.0)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        sketch = sketch_update(delta, module="layer.q", rank=rank, seed=11, dtype=dtype)
        b, r, a = low_rank_from_sketch(sketch, psi, rank, scaling=2.0)
        err = torch.linalg.matrix_norm(2.0 * b @ r @ a - delta) / torch.linalg.matrix_norm(delta)
        assert err < tol, (dtype, float(err))
        if dtype == torch.float64:  # the same factors as the exact SVD, canonical signs included
            torch.testing.assert_close(b[:, :3], exact.B[:, :3], rtol=0, atol=1e-8)
            torch.testing.assert_close(a[:3], exact.A[:3], rtol=0, atol=1e-8)


def test_sketch_of_a_full_rank_update_is_near_the_optimal_truncation() -> None:
    m, n, rank = 60, 50, 4
    gen = torch.Generator().manual_seed(8)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    delta = u @ torch.diag(0.6 ** torch.arange(n, dtype=torch.float64)) @ v.T  # decaying spectrum
    _, psi = sketch_matrices("m", m, n, rank, seed=0)
    b, r, a = low_rank_from_sketch(sketch_update(delta, module="m", rank=rank, seed=0, dtype=torch.float64),
                                   psi, rank)
    exact = init_from_update(delta, rank)
    optimal = torch.linalg.matrix_norm(delta - exact.B @ exact.R @ exact.A)
    # Measured 1.092× the optimal residual on this matrix; 1.2× guards against a broken reconstruction.
    assert torch.linalg.matrix_norm(delta - b @ r @ a) <= 1.2 * optimal


def test_sketch_matrices_are_reproducible_and_per_module() -> None:
    omega, psi = sketch_matrices("layer.q", 12, 10, 2, seed=3)
    assert omega.shape == (10, 5) and psi.shape == (11, 12) and omega.dtype == torch.float64
    again = sketch_matrices("layer.q", 12, 10, 2, seed=3)
    assert torch.equal(omega, again[0]) and torch.equal(psi, again[1])
    assert not torch.equal(omega, sketch_matrices("layer.v", 12, 10, 2, seed=3)[0])
    assert sketch_fingerprint(3) == sketch_fingerprint(3) != sketch_fingerprint(4)


def test_sketch_bytes_match_the_documented_figures() -> None:
    assert sketch_dims(384, 384, 8) == (17, 35)
    single = sketch_bytes(384, 384, 8, passes=1)
    assert single["init_upload"] == 79_872 and single["init_upload_dense"] == 589_824
    assert single["init_download"] == 4 * 8 * 768 and single["round_upload"] == single["round_download"] == 256
    two = sketch_bytes(384, 384, 8)  # ΔW·Ω up, Q down, QᵀΔW up, then B and A down
    assert two["init_upload"] == 4 * 17 * 768 == 52_224 and two["init_download"] == 4 * (17 * 384 + 8 * 768)
    four = sketch_bytes(384, 384, 8, passes=4)
    assert four["init_upload"] == 2 * two["init_upload"] and four["init_download"] == 4 * (2 * 17 * 384 + 17 * 384
                                                                                             + 8 * 768)
    assert sketch_bytes(4096, 4096, 16)["init_upload"] == 1_081_344
    assert sketch_bytes(4096, 4096, 16, passes=1)["init_upload"] == 1_638_400
    assert sketch_dims(6, 100, 4) == (6, 6)  # capped by the matrix
    with pytest.raises(ValueError, match="passes=3"):
        sketch_bytes(10, 10, 2, passes=3)


def test_two_pass_sketch_recovers_a_low_rank_update_exactly() -> None:
    m, n, rank = 40, 30, 4
    delta = low_rank(m, n, 3, seed=6)
    first = client_sketch(delta, "range", module="q", rank=rank, seed=2, dtype=torch.float64)
    q = orthonormal_basis(first["q.sketch_range"])
    second = client_sketch(delta, "corange", module="q", rank=rank, seed=2, basis=q, dtype=torch.float64)
    assert second["q.sketch_corange"].shape == (sketch_dims(m, n, rank)[0], n)
    b, r, a = factors_from_projection(q, second["q.sketch_corange"], rank, scaling=2.0)
    exact = init_from_update(delta, rank, scaling=2.0)
    torch.testing.assert_close(2.0 * b @ r @ a, delta, rtol=0, atol=1e-10)
    torch.testing.assert_close(b[:, :3], exact.B[:, :3], rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="basis Q"):
        client_sketch(delta, "corange", module="q", rank=rank, seed=2)


def test_init_reply_round_trips_through_its_wire_names(tiny_bert: str) -> None:
    model = lora_model(tiny_bert)
    config = {"init_seed": 7, "init_rank": RANK, "init_samples": 2, "init_estimator": "adam", "round": 1,
              "init_stage": "single"}
    arrays, metrics = init_reply(model, [inputs(batch=3)], config, learning_rate=1e-3)
    parsed = parse_init_reply(arrays)
    assert set(parsed) == set(lora_layers(model))
    k, l = sketch_dims(32, 32, RANK)
    assert all(p["range"].shape == (32, k) and p["corange"].shape == (l, 32) and p["range"].dtype == torch.float32
               for p in parsed.values())
    assert metrics == {"lora_sb_sketch_fingerprint": sketch_fingerprint(7), "lora_sb_round": 1.0}
    dense, _ = init_reply(model, [inputs(batch=3)], {**config, "init_stage": "dense"}, learning_rate=1e-3)
    assert all(p["dense"].shape == (32, 32) for p in parse_init_reply(dense).values())
    ranged, _ = init_reply(model, [inputs(batch=3)], {**config, "init_stage": "range"}, learning_rate=1e-3)
    assert all(set(p) == {"range"} for p in parse_init_reply(ranged).values())
    with pytest.raises(KeyError, match="not a LoRA-SB init tensor"):
        parse_init_reply({"x.lora_A.weight": torch.zeros(1)})
