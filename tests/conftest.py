import os

# Triton kernels run through the interpreter on machines without a GPU. triton.jit reads this at
# decoration time, so it must be set before any test imports relaxeq_fast.triton_kernels.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
