"""The ops layer: one wrapper per compiled op, each with a reference of the same
signature and a fake implementation for tracing (torch.compile, CUDA graphs)."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kvreviver_vllm import layout, ops
from kvreviver_vllm.ops import reference

pytestmark = pytest.mark.skipif(
    ops.implementation() != ops.COMPILED, reason="kvreviver_vllm._C is not built"
)


def schema_ops() -> list[str]:
    return sorted(name.split("::")[1] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("kvreviver::"))


def test_every_op_has_one_wrapper_and_a_reference_of_its_signature():
    assert schema_ops() == sorted(ops.OPS)
    for name in ops.OPS:
        schema = [a.name for a in getattr(torch.ops.kvreviver, name).default._schema.arguments]
        assert list(inspect.signature(getattr(ops, name)).parameters) == schema, name
        assert list(inspect.signature(getattr(reference, name)).parameters) == schema, name


def test_fake_implementations_give_the_real_output_shapes():
    gen = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 5, 64, generator=gen)
    positions, scores = torch.arange(5), torch.rand(5, generator=gen)
    coefficients = torch.randint(1, reference.SKETCH_PRIME, (3, 4), generator=gen)
    sums = torch.randn(3, 16, 64, generator=gen)
    query = torch.randn(2, 64, generator=gen)
    calls = {
        "quantize_records": lambda k, v: ops.quantize_records(k, v, positions, scores, 4, 32, 2),
        "count_sketch_estimate": lambda k, v: ops.count_sketch_estimate(sums, positions, coefficients),
        "count_sketch_logits": lambda k, v: ops.count_sketch_logits(query, sums, positions, coefficients),
    }
    records = ops.quantize_records(keys, values, positions, scores, 4, 32, 2)
    assert records.shape == (5, layout.record_bytes(64, 4, 32, 2))
    real = {name: call(keys, values) for name, call in calls.items()}
    real_dequant = ops.dequantize_records(records, 64, 4, 32, 2)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_keys, fake_values = mode.from_tensor(keys), mode.from_tensor(values)
        for name, call in calls.items():
            fake = call(fake_keys, fake_values)
            assert (fake.shape, fake.dtype) == (real[name].shape, real[name].dtype), name
        fake_dequant = ops.dequantize_records(mode.from_tensor(records), 64, 4, 32, 2)
        assert [t.shape for t in fake_dequant] == [t.shape for t in real_dequant]
        # An op that writes in place returns nothing and leaves its fake inputs be.
        cache = mode.from_tensor(torch.zeros(2, 1, 16, layout.slot_width(64, torch.float32)))
        ops.write_kv(cache, fake_keys[:1, None], fake_values[:1, None], mode.from_tensor(
            torch.tensor([3])), mode.from_tensor(torch.tensor([0])))
