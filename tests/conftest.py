import os

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("MMOE_FAST_BACKEND", None)
