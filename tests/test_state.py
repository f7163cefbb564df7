"""State between calls: converted networks are stateless at T=1 unless asked; the nodes keep SpikingJelly's contract."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional

import sj_sfn
from sj_sfn import MTNode, SFNode, zoo
from sj_sfn.ann2snn import SFNRecipe


def _cnn(rng: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    return zoo.digits_cnn(width=4).eval()


def _vit(rng: torch.Generator) -> nn.Module:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    return timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=1, num_heads=2
    ).eval()


def _images(rng: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=rng)


def _memories(model: nn.Module) -> list:
    return [m.v for _, m in sj_sfn.neuron.spiking_nodes(model)]


@pytest.mark.parametrize("build", [_cnn, _vit])
def test_converted_network_gives_the_same_output_on_every_call(build, rng: torch.Generator) -> None:
    ann = build(rng)
    calib = [_images(rng, 16) for _ in range(2)]
    snn = sj_sfn.convert(ann, calib, lam=0.1, progress=False)
    x, other = _images(rng, 8), _images(rng, 5)
    with torch.no_grad():
        first = snn(x)
        second = snn(x)
        snn(other)  # a batch of another shape in between
        third = snn(x)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(third, first, rtol=0, atol=0)
    assert all(isinstance(v, float) for v in _memories(snn)), "a stateless network keeps no membrane tensor"


def test_keep_state_keeps_spikingjelly_semantics(rng: torch.Generator) -> None:
    """keep_state=True: the membrane carries over (the output of a repeated input changes) until reset_net."""
    ann = _cnn(rng)
    calib = [_images(rng, 16)]
    snn = sj_sfn.convert(ann, calib, lam=0.1, keep_state=True, progress=False)
    x = _images(rng, 8)
    with torch.no_grad():
        first = snn(x)
        second = snn(x)
        assert all(isinstance(v, torch.Tensor) for v in _memories(snn))
        functional.reset_net(snn)
        again = snn(x)
    assert not torch.equal(first, second), "the residual membrane should change the second call"
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_recipe_keep_state_and_set_stateful(rng: torch.Generator) -> None:
    from spikingjelly.activation_based import ann2snn

    ann = _cnn(rng)
    calib = [_images(rng, 16)]
    stateless = ann2snn.Converter(SFNRecipe(calib, lam=0.1, progress=False)).convert(ann)
    stateful = ann2snn.Converter(SFNRecipe(calib, lam=0.1, keep_state=True, progress=False)).convert(ann)
    assert {m.stateful for _, m in sj_sfn.sfn_nodes(stateless)} == {False}
    assert {m.stateful for _, m in sj_sfn.sfn_nodes(stateful)} == {True}
    n = len(sj_sfn.sfn_nodes(stateful))
    x = _images(rng, 4)
    with torch.no_grad():
        stateful(x)
        assert sj_sfn.set_stateful(stateful, False) == n
        assert all(isinstance(v, float) for v in _memories(stateful)), "set_stateful(False) drops the membrane"
        torch.testing.assert_close(stateful(x), stateless(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="no MTNode/SFNode"):
        sj_sfn.set_stateful(nn.Linear(2, 2), False)
    with pytest.raises(TypeError, match="stateful"):
        sj_sfn.set_stateful(stateful, "no")


def _nodes() -> list[nn.Module]:
    return [
        SFNode(0.5, 0.7, lam=0.3, max_spikes=4, offset=0.5),
        SFNode(torch.tensor([0.3, 0.6, 0.9]), lam=0.5, max_spikes=6, channel_dim=-1),
        SFNode(1.0, lam=0.5, levels=sj_sfn.functional.power_levels(6)),
        MTNode(0.25, 8, v_init=0.1),
    ]


def test_stateless_node_multi_step_equals_single_steps_from_rest(rng: torch.Generator) -> None:
    x_seq = torch.randn(4, 2, 3, generator=rng)
    for node in _nodes():
        node.set_stateful(False)
        node.store_counts = True
        ref, counts = [], []
        for x in x_seq:
            ref.append(node(x))
            counts.append(node.last_counts)
        ref, counts = torch.stack(ref), torch.stack(counts)
        functional.set_step_mode(node, "m")
        out = node(x_seq)
        torch.testing.assert_close(out, ref, rtol=0, atol=0, msg=repr(node))
        assert torch.equal(node.last_counts, counts)
        # every step from rest: each row equals a fresh stateful node's first step
        fresh = type(node)()
        fresh.load_state_dict(node.state_dict())
        fresh.set_stateful(True)
        for t in range(x_seq.shape[0]):
            functional.reset_net(fresh)
            torch.testing.assert_close(fresh(x_seq[t]), out[t], rtol=0, atol=0)
        assert isinstance(node.v, float)


def test_stateful_flag_is_saved_and_defaults_to_true() -> None:
    node = SFNode(0.5, lam=0.5, stateful=False)
    fresh = SFNode()
    fresh.load_state_dict(node.state_dict())
    assert fresh.stateful is False
    old = {k: v for k, v in SFNode(0.5).state_dict().items()}
    old["_extra_state"] = {"max_spikes": 32, "channel_dim": None, "v_init": 0.5}  # saved before the flag existed
    fresh.load_state_dict(old)
    assert fresh.stateful is True and fresh.offset == 0.5
    mtn = MTNode(0.5, 4, stateful=False)
    m2 = MTNode()
    m2.load_state_dict(mtn.state_dict())
    assert m2.stateful is False
    m2.load_state_dict({"_extra_state": {"v_threshold": 0.5, "max_spikes": 4, "v_init": 0.0}})
    assert m2.stateful is True
