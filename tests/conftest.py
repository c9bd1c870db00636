import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MMOE_FAST_BACKEND", None)


import pytest  # noqa: E402

from mmoe_fast.backends import cpp  # noqa: E402


def _isas():
    if cpp._C is None:
        return ["none"]
    order = ["base", "avx2", "avx512"]
    return order[: order.index(cpp._C.best_isa()) + 1]


@pytest.fixture(params=_isas())
def isa(request):
    """Runs the test on one instruction set's C++ kernels (this CPU's best is the default)."""
    if cpp._C is None:
        yield request.param
        return
    before = cpp._C.isa()
    cpp._C.set_isa(request.param)
    yield request.param
    cpp._C.set_isa(before)
