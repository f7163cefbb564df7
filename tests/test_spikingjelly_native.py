"""A SpikingJelly user keeps their tools: registry, monitors, reset_net / set_step_mode on converted networks."""

from __future__ import annotations

import json

import timm
import torch
import torch.nn as nn
from spikingjelly.activation_based import functional, monitor, neuron

import sj_sfn
from sj_sfn import MTNode, SFNode, zoo


def _cnn_snn(rng: torch.Generator, **kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    ann = zoo.digits_cnn(width=4).eval()
    x = torch.rand(6, 1, 8, 8, generator=rng)
    return sj_sfn.convert(ann, [x], lam=0.1, progress=False, **kw), x


def _vit_snn(rng: torch.Generator, **kw) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=rng)))
    ann = timm.models.vision_transformer.VisionTransformer(
        img_size=8, patch_size=4, in_chans=1, num_classes=3, embed_dim=16, depth=2, num_heads=2
    ).eval()
    x = torch.rand(6, 1, 8, 8, generator=rng)
    return sj_sfn.convert(ann, [x], lam=0.25, progress=False, **kw), x


def test_nodes_are_base_nodes_and_registered() -> None:
    from spikingjelly.activation_based.distributed.vision.config import _NEURON_REGISTRY, register_neuron_class

    for cls in (MTNode, SFNode):
        assert issubclass(cls, neuron.BaseNode)
        register_neuron_class(cls)  # a BaseNode subclass: no TypeError
        assert _NEURON_REGISTRY[f"{cls.__module__}.{cls.__qualname__}"] is cls


def test_serialized_vision_config_naming_sfnode_decodes() -> None:
    """A SpikingJelly model config whose neuron is an SFNode survives JSON and builds the node."""
    from spikingjelly.activation_based.distributed.vision import ModelConfig, NeuronConfig
    from spikingjelly.activation_based.distributed.vision.config import _resolve_neuron_config
    from spikingjelly.activation_based.model.sew_resnet import SEWResNet34Config

    kwargs = {"theta_pos": 0.5, "theta_neg": 0.25, "lam": 0.5, "max_spikes": 4, "offset": 0.5, "kind": "relu"}
    cfg = SEWResNet34Config(num_classes=10, neuron_config=NeuronConfig("sj_sfn.neuron.SFNode", kwargs))
    decoded = ModelConfig.from_dict(json.loads(json.dumps(cfg.as_dict())))
    assert decoded == cfg
    cls, kw = _resolve_neuron_config(decoded.neuron_config)
    assert cls is SFNode
    node = cls(**kw)
    x = torch.tensor([0.1, 0.2, 0.4, -0.2, 9.0])
    # λθ+ = 0.25, λθ- = 0.125, rounding: k+ = clip(floor(h/0.25 + 0.5), 0, 4), k- likewise
    expected = torch.tensor([0.0, 0.25, 0.5, -0.25, 1.0])
    torch.testing.assert_close(node(x), expected, rtol=0, atol=0)
    assert node.kind == "relu" and node.v_threshold == 0.25


def _assert_monitor_sees_every_site(snn: nn.Module, x: torch.Tensor) -> None:
    sites = [n for n, _ in sj_sfn.sfn_nodes(snn)]
    assert sites
    outputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outputs.__setitem__(n, o.detach().clone()))
             for n, m in sj_sfn.sfn_nodes(snn)]  # fmt: skip
    mon = monitor.OutputMonitor(snn, neuron.BaseNode)
    rates = monitor.OutputMonitor(snn, neuron.BaseNode, function_on_output=lambda o: (o != 0).float().mean().item())
    with torch.no_grad():
        snn(x)
    for h in hooks:
        h.remove()
    assert sorted(mon.monitored_layers) == sorted(sites)
    for name in sites:
        (rec,) = mon[name]
        torch.testing.assert_close(rec, outputs[name], rtol=0, atol=0)
        (rate,) = rates[name]
        assert rate == (outputs[name] != 0).float().mean().item()
    assert any(r[0] > 0 for r in (rates[n] for n in sites)), "some site should fire"
    mon.remove_hooks()
    rates.remove_hooks()


def test_output_monitor_sees_every_sfn_site_of_a_converted_cnn(rng: torch.Generator) -> None:
    snn, x = _cnn_snn(rng)
    _assert_monitor_sees_every_site(snn, x)


def test_output_monitor_sees_every_sfn_site_of_a_converted_vit(rng: torch.Generator) -> None:
    snn, x = _vit_snn(rng)
    assert len(sj_sfn.sfn_nodes(snn)) == 2 * 8 + 1  # 8 sites per block and the head's input
    _assert_monitor_sees_every_site(snn, x)


def test_reset_net_and_set_step_mode_on_a_converted_network(rng: torch.Generator) -> None:
    snn, x = _cnn_snn(rng, keep_state=True)
    t = 3
    with torch.no_grad():
        functional.reset_net(snn)
        single = torch.stack([snn(x) for _ in range(t)])
        functional.reset_net(snn)
        functional.set_step_mode(snn, "m")
        multi = snn(x.unsqueeze(0).expand(t, *x.shape))
    torch.testing.assert_close(multi, single)
    assert {m.step_mode for _, m in sj_sfn.sfn_nodes(snn)} == {"m"}


def test_the_docs_snippets_run() -> None:
    """docs/spikingjelly.md: every python block, in order, in one namespace (what the page shows is what runs)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).parents[1] / "docs" / "spikingjelly.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 7
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/spikingjelly.md[block {i}]", "exec"), namespace)  # noqa: S102
