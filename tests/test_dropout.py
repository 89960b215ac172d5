"""The hashed dropout mask of compiled CPU graphs behaves as dropout: the drop rate, scaling, independence
between elements and calls, repeatability under a seed, and a backward through the forward's own mask."""

import torch
import torch.nn.functional as F

from camelid.model.dropout import dropout

_compiled = {}


def compiled(x, p):
    """As a model calls it: p is a constant of the compiled graph."""
    if p not in _compiled:
        _compiled[p] = torch.compile(lambda x: dropout(x, p, True), dynamic=True)
    return _compiled[p](x)


def test_compiled_mask_drops_at_rate_p_and_scales_the_rest():
    torch.manual_seed(0)
    x = torch.randn(1000, 1000)
    for p in (0.05, 0.3):
        y = compiled(x, p)
        dropped = y == 0
        # 1e6 Bernoulli draws: the rate's standard deviation is below 5e-4
        assert abs(dropped.float().mean().item() - p) < 2.5e-3
        torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))


def test_compiled_masks_are_independent_between_elements_and_calls():
    torch.manual_seed(0)
    masks = torch.stack([(compiled(torch.ones(512, 512), 0.5) == 0).float().flatten() for _ in range(8)])
    pairs = {"neighbouring elements": (masks[:, :-1], masks[:, 1:]),
             "a row apart": (masks[:, :-512], masks[:, 512:]),
             "consecutive calls": (masks[:-1], masks[1:])}
    for name, (a, b) in pairs.items():
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 5e-3, name
    # 0.5 makes every per-row rate a fair coin's: none far from half
    assert (masks.view(8, 512, 512).mean(-1) - 0.5).abs().max() < 0.1


def test_compiled_mask_repeats_under_a_seed_and_backward_uses_the_forwards_mask():
    x = torch.ones(64, 300, requires_grad=True)
    torch.manual_seed(1)
    y = compiled(x, 0.2)
    torch.manual_seed(1)
    assert torch.equal(compiled(x, 0.2), y)
    assert not torch.equal(compiled(x, 0.2), y)
    y.backward(torch.full_like(y, 3.0))
    torch.testing.assert_close(x.grad, 3.0 * y.detach())


def test_eval_and_eager_keep_the_usual_behaviour():
    x = torch.randn(32, 32)
    assert dropout(x, 0.5, False) is x and dropout(x, 0.0, True) is x
    torch.manual_seed(2)
    eager = dropout(x, 0.5, True)
    torch.manual_seed(2)
    assert torch.equal(eager, F.dropout(x, 0.5, True))
