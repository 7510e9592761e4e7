"""fedtune.flower.codec: bit-exact tensor round trips through ArrayRecord, and wire sizes."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from fedtune.errors import InvalidUpdateError
from fedtune.flower.codec import BF16_STYPE, record_to_tensors, tensors_to_record, wire_bytes

FLOAT_DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16]
SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.float64: torch.int64,
                  torch.bfloat16: torch.int16}


def round_trip(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return record_to_tensors(tensors_to_record(tensors))


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    # Compare the bit patterns, so NaN payloads and -0.0 count too (torch.equal treats NaN != NaN).
    bits = SAME_WIDTH_INT[want.dtype]
    assert torch.equal(got.contiguous().view(bits), want.contiguous().view(bits))


def special_values(dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    values = [0.0, -0.0, 1.0, -2.5, finfo.max, finfo.min, finfo.tiny, finfo.tiny / 4, float("inf"),
              float("-inf"), float("nan")]
    return torch.tensor(values, dtype=dtype)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_is_bitwise(dtype: torch.dtype) -> None:
    tensors = {"base.lora_A.weight": random_tensor((4, 16), dtype),
               "base.lora_B.weight": random_tensor((16, 4), dtype, 1),
               "special": special_values(dtype)}
    back = round_trip(tensors)
    assert list(back) == list(tensors)
    for key in tensors:
        assert_bitwise_equal(back[key], tensors[key])
        assert torch.equal(back[key].nan_to_num(), tensors[key].nan_to_num())


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_of_a_zero_dim_tensor(dtype: torch.dtype) -> None:
    scalar = torch.tensor(3.25, dtype=dtype)
    back = round_trip({"s": scalar})["s"]
    assert back.shape == torch.Size([])
    assert_bitwise_equal(back, scalar)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_round_trip_of_empty_tensors(dtype: torch.dtype) -> None:
    for shape in [(0,), (0, 3), (2, 0, 4)]:
        empty = torch.zeros(shape, dtype=dtype)
        back = round_trip({"e": empty})["e"]
        assert back.dtype == dtype and back.shape == empty.shape


def test_round_trip_of_an_empty_bfloat16_tensor() -> None:
    empty = torch.zeros((0, 3), dtype=torch.bfloat16)
    back = round_trip({"e": empty})["e"]
    assert back.dtype == torch.bfloat16 and back.shape == empty.shape


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_of_non_contiguous_input(dtype: torch.dtype) -> None:
    base = random_tensor((6, 8), dtype)
    views = {"transposed": base.t(), "strided": base[::2, 1::3], "expanded": base[0].expand(3, 8)}
    for view in views.values():
        assert not view.is_contiguous()
    back = round_trip(views)
    for key, view in views.items():
        assert_bitwise_equal(back[key], view)


def test_decoded_tensors_do_not_share_memory_with_the_input() -> None:
    t = torch.ones(4)
    back = round_trip({"t": t})["t"]
    back += 1
    assert torch.equal(t, torch.ones(4))


def test_bfloat16_travels_under_the_raw_stype() -> None:
    record = tensors_to_record({"w": torch.ones(5, dtype=torch.bfloat16)})
    array = record["w"]
    assert array.stype == BF16_STYPE
    assert len(array.data) == 10  # 2 bytes per element, nothing else


def test_corrupted_bfloat16_array_is_an_invalid_update() -> None:
    bad = Array(dtype="bfloat16", shape=(4,), stype=BF16_STYPE, data=b"\x00" * 6)  # 3 elements' worth
    with pytest.raises(InvalidUpdateError) as excinfo:
        record_to_tensors(ArrayRecord(array_dict={"layer.lora_A.weight": bad}))
    message = str(excinfo.value)
    assert "layer.lora_A.weight" in message and "6 bytes" in message and "expected 8" in message


def test_too_long_bfloat16_array_is_an_invalid_update() -> None:
    bad = Array(dtype="bfloat16", shape=(2, 2), stype=BF16_STYPE, data=b"\x00" * 10)
    with pytest.raises(InvalidUpdateError, match="10 bytes"):
        record_to_tensors(ArrayRecord(array_dict={"w": bad}))


def message_bytes(tensor: torch.Tensor) -> int:
    return wire_bytes(RecordDict({"arrays": tensors_to_record({"w": tensor})}))


def test_bfloat16_wire_size_is_two_bytes_per_element() -> None:
    n = 20_000
    values = random_tensor((n,), torch.float32)  # random: content-addressed chunks cannot deduplicate
    fp32 = message_bytes(values)
    bf16 = message_bytes(values.to(torch.bfloat16))
    # fp32 is 4N bytes of payload, bf16 2N. The rest is a fixed overhead: object headers, the
    # dtype/shape/stype strings and, for NumPy arrays, the 128-byte .npy header (~500-650 bytes
    # in all with flwr 1.42), hence 1024 bytes of slack per message and 512 on the difference.
    assert abs((fp32 - bf16) - 2 * n) < 512
    assert 2 * n <= bf16 < 2 * n + 1024
    assert 4 * n <= fp32 < 4 * n + 1024


def test_wire_bytes_grows_linearly_with_tensor_size() -> None:
    sizes = [1_000, 2_000, 4_000, 8_000]
    measured = [message_bytes(random_tensor((n,), torch.float32, seed=n)) for n in sizes]
    overhead = [b - 4 * n for b, n in zip(measured, sizes)]
    # Payload is exactly 4 bytes per float32 element; what is left is a constant header that may
    # vary by a few bytes (varint lengths), hence the 16-byte tolerance.
    assert max(overhead) - min(overhead) < 16
    assert 0 < overhead[0] < 1024  # fixed header, see test_bfloat16_wire_size_is_two_bytes_per_element


def test_wire_bytes_counts_every_array() -> None:
    one = wire_bytes(RecordDict({"arrays": tensors_to_record({"a": random_tensor((1000,), torch.float32)})}))
    two = wire_bytes(RecordDict({"arrays": tensors_to_record({"a": random_tensor((1000,), torch.float32),
                                                              "b": random_tensor((1000,), torch.float32, 1)})}))
    # The second array adds its 4000-byte payload plus its own fixed per-array overhead (a few
    # hundred bytes, see test_bfloat16_wire_size_is_two_bytes_per_element).
    assert 4000 <= two - one < 4000 + 1024
