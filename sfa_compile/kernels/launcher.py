"""Repeated Triton launches at a fraction of the host time: the compiled kernel's launcher, called directly.

``kernel[grid](*args)`` binds and specializes every argument in Triton's JIT on every call: 34 us of host time for
the decode split kernel's 63 arguments on the H100 machine, against 11 us for the compiled kernel's own launcher
(``CompiledKernel[grid](*args)``, the call Triton's JIT ends in). A decode step runs once per layer and token, so
``Launcher`` remembers the compiled kernels it launched, keyed by a refinement of what Triton specializes them on,
and calls the matching one's launcher directly: each tensor by dtype and whether its address is 16-byte aligned,
the constexprs, launch options and device, and the other arguments by value, except those named ``varying`` (the
ones that change from call to call, such as a growing cache's slot count), which are keyed by Triton's documented
rules (``triton.jit``'s ``do_not_specialize``): an integer by whether it equals 1, whether 16 divides it and its
width, a float by its type. A key's first launch goes through ``kernel[grid]``, which compiles when needed; under
Triton's interpreter every launch does.
"""

from __future__ import annotations

import inspect
import operator

import torch
import triton

from .triton_topk import interpreting

_MAX_KEYS = 4096


def _specialization(args: tuple) -> tuple:
    """What Triton specializes a kernel on, per argument: the key of the ``varying`` ones."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF, a <= 0x7FFFFFFFFFFFFFFF)
                 if type(a) is int else type(a) for a in args)


def _getter(indices: list[int]):
    """The tuple of the arguments at ``indices`` (``operator.itemgetter`` returns a bare item for one index)."""
    if len(indices) == 1:
        return lambda args: (args[indices[0]],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


class Launcher:
    """``launcher(grid, args, constexprs, num_warps, num_stages, launch_pdl)`` launches ``kernel`` like
    ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=..., launch_pdl=...)``. ``args`` are the
    kernel's runtime parameters in order, its first ``pointers`` ones tensors; ``constexprs`` all of its constexpr
    parameters, which must follow them."""

    def __init__(self, kernel: triton.runtime.JITFunction, pointers: int, varying: tuple[str, ...]):
        self.kernel, self.pointers = kernel, pointers
        # From the Python function's signature: under the interpreter ``kernel`` is not a JITFunction.
        params = list(inspect.signature(kernel.fn).parameters.values())
        constexprs = [i for i, p in enumerate(params) if "constexpr" in str(p.annotation)]
        self.runtime_params = len(params) - len(constexprs)
        if constexprs != list(range(self.runtime_params, len(params))):
            raise TypeError(f"Launcher: {kernel.fn.__name__}'s constexpr parameters must come last")
        self.constexpr_names = [p.name for p in params[self.runtime_params:]]
        names = [p.name for p in params[:self.runtime_params]]
        if unknown := set(varying) - set(names[pointers:]):
            raise TypeError(f"Launcher: {kernel.fn.__name__} has no scalar parameters {sorted(unknown)}")
        positions = range(pointers, self.runtime_params)
        self._exact = _getter([i for i in positions if names[i] not in varying])
        self._varying = _getter([i for i in positions if names[i] in varying])
        self._compiled: dict[tuple, tuple] = {}

    def __call__(self, grid: tuple[int, ...], args: tuple, constexprs: dict, num_warps: int, num_stages: int,
                 launch_pdl: bool = False) -> None:
        if len(args) != self.runtime_params:
            raise TypeError(f"Launcher: {self.kernel.fn.__name__} takes {self.runtime_params} runtime arguments, "
                            f"got {len(args)}")
        if interpreting():
            self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages)
            return
        key = (torch.cuda.current_device(), num_warps, num_stages, launch_pdl, *constexprs.items(),
               *[(t.dtype, t.data_ptr() % 16 == 0) for t in args[:self.pointers]], *self._exact(args),
               *_specialization(self._varying(args)))
        known = self._compiled.get(key)
        if known is None:
            if len(self._compiled) >= _MAX_KEYS:  # a bound, should callers vary what is keyed by value
                self._compiled.clear()
            pdl = {"launch_pdl": True} if launch_pdl else {}  # an option other backends may not know
            compiled = self.kernel[grid](*args, **constexprs, num_warps=num_warps, num_stages=num_stages, **pdl)
            self._compiled[key] = compiled, tuple(constexprs[name] for name in self.constexpr_names)
            return
        compiled, constexpr_values = known
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *constexpr_values)
