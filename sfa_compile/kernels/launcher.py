"""Repeated Triton launches at a fraction of the host time: the compiled kernel's launcher, called directly.

``kernel[grid](*args)`` binds and specializes every argument in Triton's JIT on every call, several times the host
time of the compiled kernel's ``run`` (the C launcher) that it ends in. A decode step runs once per layer and token,
so ``Launcher`` remembers the compiled kernels it launched, keyed by a refinement of what Triton
specializes them on, and calls the matching one's ``run`` as ``CompiledKernel[grid]`` does (current stream, launch
metadata and hooks for profilers) without building its closure per call. The key: the launch settings
(``LaunchConfig``: constexprs, warps, stages, programmatic launch; prepared once by the caller), the device, each
tensor by dtype and whether its address is 16-byte aligned, and the other arguments by value, except those named
``varying`` (the ones that change from call to call, such as a growing cache's slot count), which are keyed by
Triton's documented rules (``triton.jit``'s ``do_not_specialize``): an integer by whether it equals 1, whether 16
divides it and its width, a float by its type. A key's first launch goes through ``kernel[grid]``, which compiles
when needed; under Triton's interpreter every launch does.

The kernels' host code computes launch sizes with ``cdiv`` and ``next_power_of_2`` below, not with Triton's: those
are ``triton.constexpr_function``s (Triton 3.6-3.9), slow to call from the host.
"""

from __future__ import annotations

import functools
import inspect
import operator

import torch
import triton
from triton import knobs
from triton.runtime import driver

_MAX_KEYS = 4096


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of integers (``triton.cdiv`` on the host, without its constexpr-function wrapper)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n >= 1, as ``triton.next_power_of_2`` on the host."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def interpreted(kernel) -> bool:
    """Whether Triton decorated ``kernel`` for its interpreter (``TRITON_INTERPRET=1`` at import): it then made an
    InterpretedFunction, not a JITFunction. Decided once, at decoration, so later changes to the environment do not
    move it."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def _specialization(args: tuple) -> tuple:
    """What Triton specializes a kernel on, per argument: the key of the ``varying`` ones."""
    return tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                 else (a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF, a <= 0x7FFFFFFFFFFFFFFF)
                 if type(a) is int else type(a) for a in args)


@functools.lru_cache(maxsize=4096, typed=True)
def _scalar_specialization(*values) -> tuple:
    """``_specialization`` of scalars, memoized (a decode call's varying arguments repeat over the layers of a step;
    ``typed``: 2 and 2.0, 1 and True are keyed apart, as Triton compiles them apart)."""
    return _specialization(values)


def _getter(indices: list[int]):
    """The tuple of the arguments at ``indices`` (``operator.itemgetter`` returns a bare item for one index)."""
    if len(indices) == 1:
        return lambda args: (args[indices[0]],)
    return operator.itemgetter(*indices) if indices else (lambda args: ())


class LaunchConfig:
    """A kernel's compile-time launch settings, from ``Launcher.config``, which makes one object per distinct
    setting: launches key on it by identity (no per-call hashing of the constexprs)."""

    __slots__ = ("constexprs", "values", "num_warps", "num_stages", "launch_pdl")

    def __init__(self, constexprs: dict, values: tuple, num_warps: int, num_stages: int, launch_pdl: bool):
        self.constexprs, self.values = constexprs, values  # values: in the kernel's parameter order
        self.num_warps, self.num_stages, self.launch_pdl = num_warps, num_stages, launch_pdl


class Launcher:
    """``launcher(grid, args, launcher.config(constexprs, num_warps, num_stages, launch_pdl))`` launches ``kernel``
    like ``kernel[grid](*args, **constexprs, num_warps=..., num_stages=..., launch_pdl=...)``. ``args`` are the
    kernel's runtime parameters in order, its first ``pointers`` ones tensors; ``constexprs`` all of its constexpr
    parameters, which must follow them."""

    def __init__(self, kernel: triton.runtime.JITFunction, pointers: int, varying: tuple[str, ...]):
        self.kernel, self.pointers = kernel, pointers
        self.interpret = interpreted(kernel)
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
        self._configs: dict[tuple, LaunchConfig] = {}
        self._compiled: dict[tuple, object] = {}

    def config(self, constexprs: dict, num_warps: int, num_stages: int, launch_pdl: bool = False) -> LaunchConfig:
        """The launch settings for ``__call__``: every constexpr parameter of the kernel by name."""
        if sorted(constexprs) != sorted(self.constexpr_names):
            raise TypeError(f"Launcher: {self.kernel.fn.__name__} takes the constexprs {self.constexpr_names}, got "
                            f"{sorted(constexprs)}")
        values = tuple(constexprs[name] for name in self.constexpr_names)
        key = (values, num_warps, num_stages, launch_pdl)
        if (config := self._configs.get(key)) is None:
            if len(self._configs) >= _MAX_KEYS:  # a bound, should callers vary the settings without end
                self._configs.clear()
                self._compiled.clear()
            config = self._configs[key] = LaunchConfig(dict(constexprs), values, num_warps, num_stages, launch_pdl)
        return config

    def __call__(self, grid: tuple[int, ...], args: tuple, config: LaunchConfig) -> None:
        if len(args) != self.runtime_params:
            raise TypeError(f"Launcher: {self.kernel.fn.__name__} takes {self.runtime_params} runtime arguments, "
                            f"got {len(args)}")
        if self.interpret:
            self.kernel[grid](*args, **config.constexprs, num_warps=config.num_warps, num_stages=config.num_stages)
            return
        device = torch.cuda.current_device()
        key = (config, device, *[(t.dtype, t.data_ptr() % 16 == 0) for t in args[:self.pointers]],
               *self._exact(args), *_scalar_specialization(*self._varying(args)))
        compiled = self._compiled.get(key)
        if compiled is None:
            if len(self._compiled) >= _MAX_KEYS:  # a bound, should callers vary what is keyed by value
                self._compiled.clear()
            pdl = {"launch_pdl": True} if config.launch_pdl else {}  # an option other backends may not know
            self._compiled[key] = self.kernel[grid](*args, **config.constexprs, num_warps=config.num_warps,
                                                    num_stages=config.num_stages, **pdl)
            return
        grid = (*grid, 1, 1)[:3]
        stream = driver.active.get_current_stream(device)
        enter = knobs.runtime.launch_enter_hook  # None unless a profiler set one (Triton 3.6; a chain in later ones)
        metadata = None if enter is None else compiled.launch_metadata(grid, stream, *args, *config.values)
        compiled.run(grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, metadata, enter,
                     knobs.runtime.launch_exit_hook, *args, *config.values)
