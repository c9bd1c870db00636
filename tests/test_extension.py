"""The compiled extension mmoe_fast._C: built (when the Makefile asks for it) and right."""

import importlib.util
import os

import pytest
import torch

from mmoe_fast import reference
from mmoe_fast.testing import Shape, assert_close, make_inputs

HAVE_EXT = importlib.util.find_spec("mmoe_fast._C") is not None


def test_extension_is_built_when_required():
    if os.environ.get("MMOE_FAST_REQUIRE_EXT") == "1":
        assert HAVE_EXT, "mmoe_fast._C was not built (see the pip install log for the compiler error)"


@pytest.mark.skipif(not HAVE_EXT, reason="mmoe_fast._C not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gate_bias", [True, False])
def test_extension_gate_softmax_matches_reference(dtype, gate_bias):
    from mmoe_fast import _C

    inp = make_inputs(Shape(37, 19, 5, 3, 3), dtype=dtype, gate_bias=gate_bias)
    x, wg, bg = inp["x"], inp["gate_weight"], inp["gate_bias"]
    out = torch.full((37, 3, 5), float("nan"), dtype=dtype)
    kernel = _C.gate_softmax_f32 if dtype == torch.float32 else _C.gate_softmax_f64
    kernel(x.data_ptr(), wg.data_ptr(), bg.data_ptr() if gate_bias else 0, out.data_ptr(), 37, 19, 3, 5)
    ref = reference.gate_softmax(x.double(), wg.double(), None if bg is None else bg.double())
    assert_close(out, ref, 1e-6 if dtype == torch.float32 else 1e-12, "_C gate_softmax")
