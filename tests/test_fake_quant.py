"""The fake quantizer's gradient: straight-through, and the scales learning through the runtime rule."""

import pytest
import torch


@pytest.mark.parametrize("fmt", ["int4-block", "int4-channel"])
def test_scale_gradient_is_lsq_through_the_extreme_weight(fmt):
    """With scale_grad the forward values stay the runtime's bit for bit, and the gradient equals autograd of
    LSQ's formulation: v = (w/D + stopgrad(q - w/D)) * D with D = m / -8 (m the group's signed extreme)."""
    from gemma3_qat.formats import get_format, straight_through

    torch.manual_seed(0)
    f = get_format(fmt)
    w = torch.randn(8, 64, dtype=torch.float32, requires_grad=True)
    upstream = torch.randn(8, 64)
    v = straight_through(w, f.fake_quantize_values(w), fmt=f, scale_grad=1.0)
    assert torch.equal(v, f.fake_quantize_values(w.detach()))
    (v * upstream).sum().backward()
    ours = w.grad.clone()

    w2 = w.detach().clone().requires_grad_()
    groups = w2.reshape(8, 2, 32) if fmt == "int4-block" else w2.reshape(8, 1, 64)
    absmax = groups.detach().abs().argmax(dim=-1, keepdim=True)
    m = torch.gather(groups, -1, absmax)  # differentiable: the weight the rule reads
    d = m / -8.0
    D = d + (d.to(torch.float16).float() - d).detach()
    q = (groups.detach() / D.detach() + 8.5).trunc().clamp(0, 15) - 8
    ref = (groups / D + (q - groups / D).detach()) * D
    (ref.reshape(8, 64) * upstream).sum().backward()
    torch.testing.assert_close(ours, w2.grad, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, upstream)  # the scale path did add something, at the extremes only
    changed = (ours != upstream).reshape(groups.shape).sum(dim=-1)
    assert int(changed.max()) == 1
