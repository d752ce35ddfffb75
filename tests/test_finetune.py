"""Fine-tuning levers that make top-k learnable: straight-through top-k, the dropped-energy penalty, gradual
sparsification and the final learning-rate factor."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hf_models import build
from torch.optim.optimizer import register_optimizer_step_pre_hook

import sfa_compile
from sfa_compile.conversion.modules import SFAAttention
from sfa_compile.kernels.topk import sparsify_dense
from sfa_compile.training.distill import dropped_energy
from sfa_compile.training.observers import observe
from sfa_compile.training.straight_through import sfa_attention, straight_through_topk


def _qkv(seed=0, heads=4, key_heads=2, length=9, dim=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, length, dim, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(2, key_heads, length, dim, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(2, key_heads, length, dim, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])  # the reference; SDPA's CPU flash engine
@pytest.mark.parametrize("masking", ["causal", "bool_mask"])
def test_straight_through_keeps_the_forward_and_passes_gradients_to_dropped_features(masking, dtype):
    q, k, v = _qkv(dtype=dtype)
    mask = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[..., 0] = True  # no fully masked rows
    kwargs = dict(is_causal=True) if masking == "causal" else dict(attn_mask=mask)
    grad_out = torch.randn(2, 4, 9, 16, generator=torch.Generator().manual_seed(2), dtype=dtype)

    exact = sfa_attention(q, k, v, topk=4, enable_gqa=True, **kwargs)
    dq_exact, = torch.autograd.grad(exact, q, grad_out)
    ste = sfa_attention(q, k, v, topk=4, enable_gqa=True, straight_through=True, **kwargs)
    dq_ste, dk_ste = torch.autograd.grad(ste, (q, k), grad_out)
    torch.testing.assert_close(ste, exact)

    # Expected: SDPA on the sparsified q and k taken as leaves; its gradient reaches every feature.
    qs, keep = sparsify_dense(q.detach(), 4)
    ks = sparsify_dense(k.detach(), 4)[0]
    qs.requires_grad_(True)
    ks.requires_grad_(True)
    dense = F.scaled_dot_product_attention(qs, ks, v, enable_gqa=True, **kwargs)
    dqs, dks = torch.autograd.grad(dense, (qs, ks), grad_out)
    torch.testing.assert_close(dq_ste, dqs)
    torch.testing.assert_close(dk_ste, dks)
    assert (dq_ste[~keep] != 0).any()
    assert (dq_exact[~keep] == 0).all()  # outside the block, SFA's gradient skips dropped features


def test_straight_through_reaches_converted_plain_module_sites():
    site = SFAAttention(key_heads=1, head_dim=16, topk=4).double()
    q, k, v = _qkv(heads=1, key_heads=1)
    keep = sparsify_dense(q.detach(), 4)[1]
    with straight_through_topk(site):
        dq, = torch.autograd.grad(site(q, k, v).sum(), q)
    assert (dq[~keep] != 0).any()


def test_straight_through_reaches_hugging_face_sites():
    def q_proj_grad(model, inputs, straight):
        model.zero_grad()
        with straight_through_topk(model) if straight else torch.enable_grad():
            model(**inputs).logits.square().mean().backward()
        return model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    model, inputs, _, _ = build("llama", "eager")
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), progress=False)
    assert not torch.allclose(q_proj_grad(model, inputs, True), q_proj_grad(model, inputs, False))


def test_dropped_energy_by_hand():
    x = torch.tensor([[3.0, -1.0, 2.0, 0.5], [0.0, 0.0, 0.0, 0.0]])
    # Row 0 keeps 3 and 2, drops 1 + 0.25 of 14.25; the all-zero row counts 0.
    assert dropped_energy(x, 2).item() == pytest.approx(1.25 / 14.25 / 2)
    assert dropped_energy(x, 4).item() == 0.0


def _converted_llama(topk=4):
    model, inputs, _, head_dim = build("llama", "eager")
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=topk), [inputs], progress=False)
    return model, inputs


def test_sparsity_weight_adds_the_dropped_energy_term():
    model, inputs = _converted_llama()
    with torch.no_grad(), sfa_compile.attention_distillation(model, sparsity=True) as distill:
        model(**inputs)
        energy = distill.dropped_energy().item()
    assert 0.0 < energy < 1.0
    first = [sfa_compile.finetune(copy.deepcopy(model), [inputs], 1, sparsity_weight=w, train_mode=False,
                                  progress=False)[0] for w in (0.0, 0.5)]
    assert first[1] - first[0] == pytest.approx(0.5 * energy, rel=1e-4)


def test_warmup_topks_and_final_lr_factor_follow_the_schedule():
    model, inputs = _converted_llama()
    layer = model.model.layers[0].self_attn
    seen, lrs = [], []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        with observe(model, lambda module, *rest: seen.append(module.sfa.topk) if module is layer else None):
            sfa_compile.finetune(model, [inputs], 8, lr=1e-3, warmup_topks=(12, 8), final_lr_factor=0.5,
                                 progress=False)
    finally:
        handle.remove()
    assert seen == [12, 12, 8, 8, 4, 4, 4, 4]  # steps // (2 + 2) = 2 steps per warm-up value
    assert lrs == pytest.approx([1e-3] * 6 + [5e-4] * 2)  # the last quarter at half the rate
    assert all(m.sfa.topk == 4 for m in (lay.self_attn for lay in model.model.layers))


def test_topk_restored_when_training_fails():
    model, inputs = _converted_llama()

    def failing(out, example):
        raise RuntimeError("task loss failed")

    with pytest.raises(RuntimeError, match="task loss failed"):
        sfa_compile.finetune(model, [inputs], 4, warmup_topks=(8,), task_loss=failing, progress=False)
    assert model.model.layers[0].self_attn.sfa.topk == 4


@pytest.mark.parametrize("kwargs,message", [
    (dict(warmup_topks=(4,)), "above the model's topk"),
    (dict(warmup_topks=(17,)), "at most its head dim"),
    (dict(warmup_topks=(8, 6, 5), steps=4), "need at least 5 steps"),
    (dict(sparsity_weight=-1.0), "sparsity_weight must be >= 0"),
    (dict(final_lr_factor=0.0), "final_lr_factor > 0"),
    (dict(lam=-0.5), "lam must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr must be a finite number >= 0"),
    (dict(model_lr=float("inf")), "model_lr must be a finite number >= 0"),
    (dict(steps=-1), "steps must be an integer >= 0"),
    (dict(steps=2.5), "steps must be an integer >= 0"),
])
def test_bad_schedules_are_refused(kwargs, message):
    model, inputs = _converted_llama()
    steps = kwargs.pop("steps", 8)
    with pytest.raises(ValueError, match=message):
        sfa_compile.finetune(model, [inputs], steps, progress=False, **kwargs)


def test_data_the_model_cannot_be_called_with_is_refused_before_training():
    model, inputs = _converted_llama()
    with pytest.raises(TypeError, match="finetune: data item 1 is of type str"):
        sfa_compile.finetune(model, [inputs, "some text"], 2, progress=False)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_convert_and_finetune_inside_no_grad_or_inference_mode(context):
    """An evaluation script's context around conversion and fine-tuning changes nothing: the same projections and
    weights as outside it (and the caller's context is back afterwards)."""
    model, inputs, _, _ = build("llama", "eager")
    twin = copy.deepcopy(model)
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [inputs], progress=False)
    sfa_compile.finetune(model, [inputs], 2, progress=False, train_model=True)
    with context():
        batch = {name: x.clone() for name, x in inputs.items()}  # inference tensors under inference mode
        sfa_compile.convert(twin, sfa_compile.SFAConfig(topk=4), [batch], progress=False)
        sfa_compile.finetune(twin, [batch], 2, progress=False, train_model=True)
        assert not torch.is_grad_enabled()
    want, got = model.state_dict(), twin.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[name], got[name]) for name in want)


def test_finetune_inside_autocast_trains_and_leaves_r_orthogonal_float32():
    model, inputs, _, _ = build("llama", "eager")
    sfa_compile.convert(model, sfa_compile.SFAConfig(topk=4), [inputs], progress=False)
    before = model.model.layers[0].self_attn.sfa.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a mixed-precision training loop around finetune
        losses = sfa_compile.finetune(model, [inputs], 3, lr=1e-2, progress=False)
    r = model.model.layers[0].self_attn.sfa.weight.detach()
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert r.dtype == torch.float32 and not torch.equal(r, before)  # trained
    assert (r.transpose(-1, -2) @ r - torch.eye(r.size(-1))).abs().max() < 1e-5  # still orthogonal


def test_each_step_inside_autocast_sees_the_updated_weights():
    # An enclosing autocast caches its casts of the weights until the block ends; a step must not run on stale ones.
    model, inputs = _converted_llama()
    updated = copy.deepcopy(model)
    kwargs = dict(train_model=True, model_lr=1e-2, train_mode=False, progress=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = sfa_compile.finetune(model, [inputs], 2, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sfa_compile.finetune(updated, [inputs], 1, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a fresh block: the loss at the once-updated weights
        expected = sfa_compile.finetune(updated, [inputs], 1, **kwargs)[0]
    assert losses[1] != pytest.approx(losses[0], rel=0.2)
    assert losses[1] == pytest.approx(expected, rel=0.02)  # bf16 rounding; stale weights gave a 4x lower loss


def test_eq8_weight_defaults_to_a_regularizer_beside_a_task_loss():
    model, inputs = _converted_llama()
    task = lambda out, example: out.logits.square().mean()  # noqa: E731
    with torch.no_grad(), sfa_compile.attention_distillation(model, sparsity=False) as distill:
        out = model(**inputs)
        task_value, eq8 = task(out, inputs).item(), distill.loss().item()
    assert eq8 > 0.0
    alone = sfa_compile.finetune(copy.deepcopy(model), [inputs], 1, train_mode=False, progress=False)[0]
    beside = sfa_compile.finetune(copy.deepcopy(model), [inputs], 1, task_loss=task, train_mode=False,
                                  progress=False)[0]
    assert alone == pytest.approx(eq8, rel=1e-4)
    assert beside == pytest.approx(task_value + 0.01 * eq8, rel=1e-4)
