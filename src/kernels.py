"""Compiled CPU kernels: how numba code is loaded, and the array views it works on.

The percentile (``src.percentile``) and the fused dead-zone quantizer (``src.quantizer``) run numba
kernels on CPU tensors. numba is imported on the first CPU call, not with these modules: its import
(~0.15 s) and its start-up at the first compiled call (~0.4 s) would cost ``--dry-run``,
configuration errors and GPU runs for nothing. ``cache=True`` stores the machine code in
``__pycache__`` (or numba's per-user cache directory), so later processes load it in ~10 ms per
dtype instead of compiling it for seconds.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from torch import Tensor


def compile_kernel(function: Callable) -> Callable:
    """``function`` compiled by ``numba.njit(cache=True, nogil=True)``; imports numba, so call it on first CPU use."""
    import numba

    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # numba found no writable cache directory: compile in every process instead
        return numba.njit(nogil=True)(function)


def compile_into(namespace: dict[str, Any], kernels: Iterable[Callable]) -> None:
    """Replaces each of ``kernels`` in ``namespace`` (a module's globals) by its compiled form: kernels call one
    another through those globals, which numba resolves when it compiles the caller."""
    for kernel in kernels:
        namespace[kernel.__name__] = compile_kernel(kernel)


def flat_array(tensor: Tensor) -> np.ndarray:
    """The elements of a dense CPU tensor as a 1-D numpy view in memory order (contiguous, channels-last or
    transposed alike; a copy for other layouts), so that tensors with equal strides give views whose elements
    pair up. numpy(force=True) detaches, faster than a detach() call."""
    return tensor.numpy(force=True).ravel(order="K")
