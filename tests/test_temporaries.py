"""Sites of a converted graph fire over a temporary that nothing else reads (sj_sfn.ann2snn.temporaries).

The spike must be the one the node returns out of place, bit for bit, and nobody may see the write: not a later
reader of the tensor (a residual), not a forward hook on the site or on the module that made the tensor.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from torch import fx

import sj_sfn
from sj_sfn import SFNode, cpu
from sj_sfn import functional as F
from sj_sfn.ann2snn.temporaries import fire_temporary, fired_site
from sj_sfn.neuron import reference_fire

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the in-place write is the CPU kernel's bound call")


class _Residual(nn.Module):
    """Three kinds of site input: one read twice (a residual), a GELU module's output seen through dropout (the
    identity in eval mode), an addition's output."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.c4 = (nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1) for i in range(3))
        self.c3, self.skip = nn.Conv2d(8, 4, 1), nn.Conv2d(3, 8, 1)
        self.act, self.drop = nn.GELU(), nn.Dropout(0.1)

    def forward(self, x):
        y = self.c1(x)
        h = self.c2(torch.relu(y))  # the site on relu(y) reads y, which the last line reads again
        z = self.c4(self.drop(self.act(h)))  # an input site over the GELU's output
        return self.c3(torch.relu(z + self.skip(x)) + y)  # an input site on the addition


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.fixture(scope="module")
def converted():
    torch.manual_seed(0)
    ann = _Residual().eval()
    calib = [torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return ann, sj_sfn.convert(ann, calib, progress=False, reconstruct=0)


def test_only_sites_over_a_single_use_temporary_are_rerouted(converted) -> None:
    _, snn = converted
    assert isinstance(snn, fx.GraphModule)
    rerouted = {n.args[0].target: n.args[2] for n in snn.graph.nodes if n.op == "call_function" and n.target is fire_temporary}
    assert rerouted, "no site was rerouted"
    for node in snn.graph.nodes:
        site = fired_site(node)
        if site is None or not isinstance(snn.get_submodule(site), SFNode):
            continue
        src = node.args[1] if node.op == "call_function" else node.args[0]
        if node.op == "call_function":
            assert len(src.users) == 1, f"{site} writes over a tensor that {len(src.users)} nodes read"
        else:  # here every single-use input is a fresh tensor: a site stays a module call only for a shared input
            assert len(src.users) > 1 or src.op == "placeholder", f"{site} was not rerouted"
    assert any(n.op == "call_module" and isinstance(snn.get_submodule(n.target), SFNode) for n in snn.graph.nodes)


def test_the_graph_computes_the_reference_bit_for_bit_and_leaves_the_input_alone(converted, rng) -> None:
    _, snn = converted
    x = torch.randn(3, 3, 8, 8, generator=rng)
    keep = x.clone()
    with torch.no_grad():
        snn(x)  # binds every site's kernel call
        out = snn(x)
        with reference_fire():  # out of place everywhere
            ref = snn(x)
    assert _bits_equal(out, ref) and torch.equal(x, keep)
    buffer = io.BytesIO()  # the rerouted graph saves and loads as a GraphModule does
    torch.save(snn, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        loaded(x)
        assert _bits_equal(loaded(x), ref) and _bits_equal(copy.deepcopy(snn)(x), ref)


def test_a_hook_on_the_producer_sees_its_own_output(converted, rng) -> None:
    """A forward hook on the module that made a site's input (the GELU) keeps that module's output, not the spike."""
    _, snn = converted
    rerouted = [n for n in snn.graph.nodes if n.op == "call_function" and n.target is fire_temporary and n.args[2] is not None]
    assert rerouted
    producer = rerouted[0].args[2].target
    seen: list[torch.Tensor] = []
    x = torch.randn(2, 3, 8, 8, generator=rng)
    with torch.no_grad():
        snn(x)
        expected = snn.get_submodule(producer)(_producer_input(snn, rerouted[0], x))
        handle = snn.get_submodule(producer).register_forward_hook(lambda m, a, out: seen.append(out))
        try:
            out = snn(x)
        finally:
            handle.remove()
        with reference_fire():
            ref = snn(x)
    assert _bits_equal(seen[0], expected), "the site wrote over a tensor a hook kept"
    assert _bits_equal(out, ref)


def _producer_input(snn: fx.GraphModule, call: fx.Node, x: torch.Tensor) -> torch.Tensor:
    """What the producer of ``call``'s input receives for the model input ``x`` (the graph run up to it)."""
    captured: list[torch.Tensor] = []
    module = snn.get_submodule(call.args[2].target)
    handle = module.register_forward_pre_hook(lambda m, a: captured.append(a[0].clone()))
    try:
        snn(x)
    finally:
        handle.remove()
    return captured[0]


def test_fire_temporary_writes_over_x_only_on_the_bound_call_without_hooks(rng) -> None:
    site = SFNode(torch.tensor(0.3), torch.tensor(0.2), levels=F.float_levels(3, 4, subnormal=True), offset=0.5, stateful=False)
    x = torch.randn(5, 40, generator=rng)
    producer = nn.Identity()
    with torch.no_grad():
        first = fire_temporary(site, x.clone(), producer)  # the first call binds: out of place
        expected = site(x.clone())
        assert _bits_equal(first, expected)
        t = x.clone()
        assert fire_temporary(site, t, producer) is t and _bits_equal(t, expected)
        handle = producer.register_forward_hook(lambda m, a, out: None)
        t = x.clone()
        out = fire_temporary(site, t, producer)
        handle.remove()
        assert out is not t and torch.equal(t, x) and _bits_equal(out, expected)
        handle = site.register_forward_hook(lambda m, a, out: None)
        t = x.clone()
        out = fire_temporary(site, t, None)
        handle.remove()
        assert out is not t and torch.equal(t, x) and _bits_equal(out, expected)
    t = x.clone().requires_grad_()
    out = fire_temporary(site, t, None)  # autograd: out of place, through the node
    assert out is not t and _bits_equal(out.detach(), expected)
