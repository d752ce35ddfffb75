"""The Triton launcher's key: a refinement of what Triton compiles separate kernels for (its GPU path is exercised by
tests/kernels/test_decode.py's relaunch test, which fails on the H100 when alignment is left out of the key)."""

import pytest
import torch

_specialization = pytest.importorskip("sfa_compile.kernels.launcher")._specialization


def test_launcher_keys_what_triton_specializes_on():
    """Arguments Triton compiles different kernels for get different keys; those it does not, the same key (so a
    growing cache's next slot count reuses the kernel)."""
    t = torch.empty(64, dtype=torch.float16)
    key = _specialization((t, 40, 2.0))
    assert _specialization((t[8:], 56, 0.5)) == key  # still aligned, 16 still does not divide
    assert _specialization((t[1:], 40, 2.0)) != key  # 2 bytes off 16-byte alignment
    assert _specialization((t.float(), 40, 2.0)) != key
    assert _specialization((t, 48, 2.0)) != key  # 16 divides it
    assert _specialization((t, 1, 2.0)) != _specialization((t, 3, 2.0))
    assert _specialization((t, 2 ** 31 + 8, 2.0)) != key  # a 64-bit integer
    assert _specialization((t, 40, 2)) != key  # an integer where a float was


def test_launcher_refuses_kernels_and_arguments_it_cannot_key():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    from sfa_compile.kernels.launcher import Launcher

    @triton.jit
    def copy(X, Y, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def constexpr_first(BLOCK: tl.constexpr, X, n):
        pass

    with pytest.raises(TypeError, match="constexpr parameters must come last"):
        Launcher(constexpr_first, pointers=1, varying=())
    with pytest.raises(TypeError, match=r"no scalar parameters \['m'\]"):
        Launcher(copy, pointers=2, varying=("m",))
    launcher = Launcher(copy, pointers=2, varying=("n",))
    with pytest.raises(TypeError, match=r"takes the constexprs \['BLOCK'\], got \['BLOCK', 'WIDTH'\]"):
        launcher.config(dict(BLOCK=16, WIDTH=2), 1, 1)
    config = launcher.config(dict(BLOCK=16), 1, 1)
    x = torch.randn(16)
    with pytest.raises(TypeError, match="takes 3 runtime arguments, got 2"):
        launcher((1,), (x, x), config)


def test_launch_configs_are_one_object_per_setting():
    """Launches key on a config by identity, so equal settings must give the same object and different ones not."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    from sfa_compile.kernels.launcher import Launcher

    @triton.jit
    def kernel(X, n, BLOCK: tl.constexpr, EVEN: tl.constexpr):
        pass

    launcher = Launcher(kernel, pointers=1, varying=())
    config = launcher.config(dict(BLOCK=16, EVEN=True), 4, 3)
    assert launcher.config(dict(EVEN=True, BLOCK=16), 4, 3) is config
    assert config.values == (16, True)
    for other in (launcher.config(dict(BLOCK=32, EVEN=True), 4, 3), launcher.config(dict(BLOCK=16, EVEN=False), 4, 3),
                  launcher.config(dict(BLOCK=16, EVEN=True), 2, 3), launcher.config(dict(BLOCK=16, EVEN=True), 4, 2),
                  launcher.config(dict(BLOCK=16, EVEN=True), 4, 3, launch_pdl=True)):
        assert other is not config


def test_host_integer_helpers_equal_tritons():
    """The host's cdiv and next_power_of_2 (without Triton's per-call constexpr-function cost) give Triton's
    results."""
    triton = pytest.importorskip("triton")
    from sfa_compile.kernels.launcher import cdiv, next_power_of_2

    for n in [*range(1, 1100), 2 ** 31 - 1, 2 ** 31, 2 ** 31 + 1, 3 * 2 ** 40]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 3, 16, 128, 4096):
            assert cdiv(n, d) == triton.cdiv(n, d), (n, d)
    assert cdiv(0, 16) == 0


def test_memoized_scalar_keys_keep_types_apart():
    """The memoized key of the varying scalars equals the rule's, and keeps apart values Python hashes alike but
    Triton compiles apart (2 and 2.0, 1 and True), whichever came first."""
    from sfa_compile.kernels.launcher import _scalar_specialization

    for values in [(40, 2.0), (40, 2), (48, 0.5), (1, 3), (True, 3), (2 ** 31 + 8, 1.0)]:
        assert _scalar_specialization(*values) == _specialization(values), values
    assert _scalar_specialization(40, 2.0) != _scalar_specialization(40, 2)
    assert _scalar_specialization(1, 3) != _scalar_specialization(True, 3)


@pytest.mark.gpu
def test_repeated_launches_run_and_call_the_launch_hooks():
    """After its first launch a kernel runs through the compiled kernel's ``run`` (no JIT), with fresh arguments
    each call, and a launch hook set by a profiler (proton, for one) still sees every launch with its metadata."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")
    from triton import knobs

    from sfa_compile.kernels.launcher import Launcher

    @triton.jit
    def scale_copy(X, Y, n, factor, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(Y + offs, tl.load(X + offs, mask=offs < n) * factor, mask=offs < n)

    launcher = Launcher(scale_copy, pointers=2, varying=("n",))
    config = launcher.config(dict(BLOCK=64), 4, 1)
    seen = []
    hook = lambda metadata: seen.append(metadata.get()["name"])  # noqa: E731
    chain = knobs.runtime.launch_enter_hook  # a HookChain from Triton 3.7 on, else None or a function
    for n, hooked in ((100, False), (100, False), (130, False), (100, True), (77, True)):
        if hooked and hasattr(chain, "add"):
            chain.add(hook)
        elif hooked:
            knobs.runtime.launch_enter_hook = hook
        try:
            x = torch.randn(n, device="cuda")
            y = torch.full_like(x, float("nan"))
            launcher((triton.cdiv(n, 64),), (x, y, n, 0.5), config)
            torch.testing.assert_close(y, x * 0.5, rtol=0, atol=0)
        finally:
            if hooked and hasattr(chain, "add"):
                chain.remove(hook)
            elif hooked:
                knobs.runtime.launch_enter_hook = chain
    assert seen == ["scale_copy", "scale_copy"]
    assert len(launcher._compiled) == 1  # one key: n is varying, and 100, 130, 77 specialize alike


def test_prefill_and_decode_paths_agree_on_the_interpreter(monkeypatch):
    """The prefill kernels' tile choice (``interpreting``) and the decode launcher decide the interpreter alike: by
    what ``triton.jit`` made of the kernels when they were decorated, not by the environment read later."""
    pytest.importorskip("triton")
    import os

    from sfa_compile.kernels import decode_launch, triton_topk

    assert triton_topk.interpreting() == decode_launch.SPLIT.interpret
    assert triton_topk.interpreting() == (os.environ.get("TRITON_INTERPRET") == "1")  # conftest sets it on CPUs
    monkeypatch.setenv("TRITON_INTERPRET", "0" if triton_topk.interpreting() else "1")
    assert triton_topk.interpreting() == decode_launch.SPLIT.interpret
