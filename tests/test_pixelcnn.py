"""The gated PixelCNN prior: causal masks, conditioning, sampling, and fitting real codes."""

from __future__ import annotations

import pytest
import torch

from probvq.codebook import Codebook
from probvq.pixelcnn import GatedPixelCNN
from probvq.priors import AutoregressiveCodes


def values(batch=2, side=5, dim=3, seed=0):
    return torch.randn(batch, side, side, dim, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kernel", [3, 5])
def test_every_logit_reads_only_earlier_positions(kernel):
    torch.manual_seed(0)
    net = GatedPixelCNN(4, 3, hidden=8, layers=3, kernel=kernel)
    value = values()
    base = net.conditional_logits(value)
    side = value.shape[1]
    for n in range(side * side):
        i, j = divmod(n, side)
        moved = value.clone()
        moved[:, i, j] += 1.0
        changed = (net.conditional_logits(moved) - base).abs().amax((0, -1)).flatten() > 1e-6
        assert not changed[: n + 1].any(), (n, changed.nonzero().flatten().tolist())
        if n + 1 < side * side:  # the next position in row-major order always reads it
            assert changed[n + 1], n


def test_the_gradient_of_a_logit_reaches_only_earlier_positions():
    torch.manual_seed(1)
    net = GatedPixelCNN(4, 3, hidden=8, layers=4, kernel=3)
    value = values(batch=1).requires_grad_()
    net.conditional_logits(value)[0, 2, 2].sum().backward()
    reached = value.grad[0].abs().sum(-1).flatten() > 0
    assert reached[:12].all() and not reached[12:].any()  # position 12 = (2, 2) of a 5 x 5 grid


def test_conditioning_on_labels_and_context_changes_the_logits_and_keeps_batches_apart():
    torch.manual_seed(2)
    net = GatedPixelCNN(4, 3, hidden=8, layers=2, num_classes=3, context_channels=2)
    value = values()
    labels = torch.tensor([0, 2])
    context = torch.randn(2, 2, 5, 5)
    a = net.given(labels=labels).conditional_logits(value)
    b = net.given(labels=labels.flip(0)).conditional_logits(value)
    assert not torch.allclose(a, b)
    single = net.given(labels=labels[:1], context=context[:1]).conditional_logits(value[:1])
    both = net.given(labels=labels, context=context).conditional_logits(value)
    torch.testing.assert_close(single, both[:1])
    with pytest.raises(ValueError, match="num_classes"):
        GatedPixelCNN(4, 3).given(labels=labels).conditional_logits(value)
    with pytest.raises(ValueError, match="kernel"):
        GatedPixelCNN(4, 3, kernel=4)
    with pytest.raises(ValueError, match="value"):
        net.conditional_logits(torch.randn(2, 5, 5, 4))


def test_ancestral_samples_follow_the_prior_of_a_two_position_grid():
    # Exact joint of a 1 x 2 grid by enumeration against sample frequencies.
    torch.manual_seed(3)
    space = Codebook(3, 2, init="normal")
    net = GatedPixelCNN(3, 2, hidden=8, layers=2, kernel=3)
    codes = AutoregressiveCodes(net, space, (1, 2))
    index = torch.cartesian_prod(torch.arange(3), torch.arange(3)).view(9, 1, 2)
    with torch.no_grad():
        exact = codes.log_prob(space.code_of_index(index)).exp()
        # a sample shape of two dims, so that reading the wrong dim of it cannot go unseen
        drawn = space.index_of(codes.sample(torch.Size([2, 3000])))
        assert drawn.shape == (2, 3000, 1, 2)
        drawn = drawn.view(-1, 2)
    assert abs(float(exact.sum()) - 1) < 1e-5
    freq = torch.bincount(drawn[:, 0] * 3 + drawn[:, 1], minlength=9) / 6000.0
    assert (freq - exact).abs().max() < 4 * (0.25 / 6000) ** 0.5


def test_fitting_lowers_the_nll_of_structured_codes():
    # Codes whose rows repeat a pattern: a causal model can predict all but the first row.
    torch.manual_seed(4)
    space = Codebook(4, 3, init="normal")
    pattern = torch.randint(4, (64, 1, 6))
    index = pattern.expand(64, 6, 6)
    net = GatedPixelCNN(4, 3, hidden=16, layers=3, kernel=3)
    codes = AutoregressiveCodes(net, space, (6, 6))
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-2)
    code = space.code_of_index(index).detach()  # the codes are data here; the table stays fixed
    with torch.no_grad():
        start = float(-codes.log_prob(code).mean())
    for _ in range(150):
        loss = -codes.log_prob(code).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # 36 positions of log 4 at the start; the first row (6 positions) stays unpredictable
    assert start > 36 * 1.2
    final = float(loss.detach())
    assert final < 6 * torch.log(torch.tensor(4.0)) + 2.0, (start, final)
