"""Loaded by pytest before anything else is collected (doctests of src/ included).

Triton fixes its mode when it is first imported: with ``TRITON_INTERPRET=1`` its kernels run on CPU
tensors through the interpreter, otherwise they need a GPU. On a machine without CUDA the suite therefore
turns the interpreter on before any module imports triton, so the Triton kernel tests run instead of
being skipped. On a GPU machine nothing is set and the same tests run compiled on the device.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
