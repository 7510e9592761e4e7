"""The wire format: adapter tensors to Flower ``ArrayRecord`` and back, and message sizes.

Float32/float16/float64 tensors travel as NumPy arrays (Flower's own ``numpy.ndarray``
serialisation). ``ArrayRecord`` rejects bfloat16, so bfloat16 tensors travel as their raw
2-byte words under a stype of our own: lossless, and no larger than the tensor itself.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedtune.errors import InvalidUpdateError

BF16_STYPE = "fedtune.bfloat16.raw"


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Encode named tensors as an ``ArrayRecord`` (bfloat16 included, bit-exact)."""
    arrays = {}
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().tobytes()
            arrays[key] = Array(dtype="bfloat16", shape=tuple(t.shape), stype=BF16_STYPE, data=raw)
        else:
            arrays[key] = Array(t.numpy())
    return ArrayRecord(array_dict=arrays)


def record_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Decode an ``ArrayRecord`` made by :func:`tensors_to_record` (or by plain Flower)."""
    out = {}
    for key, array in record.items():
        if array.stype == BF16_STYPE:
            expected = int(np.prod(array.shape, dtype=np.int64)) * 2
            if len(array.data) != expected:
                raise InvalidUpdateError(f"{key}: {len(array.data)} bytes for a bfloat16 array of shape "
                                         f"{tuple(array.shape)} (expected {expected})")
            flat = torch.from_numpy(np.frombuffer(array.data, dtype=np.int16).copy())
            out[key] = flat.view(torch.bfloat16).reshape(tuple(array.shape))
        else:
            try:
                out[key] = torch.from_numpy(np.array(array.numpy(), copy=True))
            except (TypeError, ValueError) as e:
                raise InvalidUpdateError(f"{key}: cannot decode array ({e})") from e
    return out


def wire_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower ships it: the sum of its deflated objects.

    Flower sends a message as a tree of content-addressed objects (records, arrays,
    array chunks), each distinct object once. Summing the deflated size of the distinct
    objects of the content gives what crosses the wire for it; the message's own
    metadata header (a few hundred bytes) is not counted.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(content).values())
