"""The benchmark nets from published EBM code: shapes, and the layouts the benchmarks run them
in."""

import warnings

import pytest
import torch

from ebm_fast.experiments.nets import NETS, ICDConvEnergy, IGEBMResNet, JEMWideResNet
from ebm_fast.precision import fast_energy, resolve_precision


@pytest.mark.parametrize("name", sorted(NETS))
def test_each_net_gives_one_energy_per_state(name):
    make, shape = NETS[name]
    torch.manual_seed(0)
    energy = make()(torch.rand(2, *shape))
    assert energy.shape in ((2,), (2, 1)) and energy.isfinite().all()


def test_the_nets_have_their_papers_sizes():
    """Parameter counts follow from the described layouts (a changed layer changes them)."""

    def count(net):
        return sum(p.numel() for p in net.parameters())

    assert count(IGEBMResNet()) == 5_315_073  # 128 filters
    assert count(JEMWideResNet()) == 2_747_530  # WRN-16-4, 10 classes
    assert count(ICDConvEnergy()) == 4_859_234  # filter_dim 64
    assert JEMWideResNet().logits(torch.rand(3, 3, 32, 32)).shape == (3, 10)


def test_jem_energy_is_minus_logsumexp_of_its_logits():
    torch.manual_seed(0)
    net, x = JEMWideResNet(depth=10, widen=1), torch.rand(3, 3, 32, 32)
    torch.testing.assert_close(net(x), -net.logits(x).logsumexp(1))
    with pytest.raises(ValueError, match="6n \\+ 4"):
        JEMWideResNet(depth=12)


@pytest.mark.parametrize(
    "name, channels_last", [("igebm", True), ("jem_wrn", True), ("icd", False)]
)
def test_the_image_nets_take_the_layout_auto_picks_on_a_cpu(name, channels_last):
    """IGEBM's and JEM's nets run in channels-last; ICD's instance norms keep it contiguous."""
    make, shape = NETS[name]
    net, x = make(), torch.rand(2, *shape)
    choice = resolve_precision("fp32", "cpu", torch.float32, state_dim=4, energy=net)
    assert choice.channels_last == channels_last
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no part of the choice refused
        _, kept = fast_energy(net, choice, x)
    assert kept == choice
