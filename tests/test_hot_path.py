"""The inference hot path of a stateless CPU site (``SFNode.forward`` through a bound kernel call).

After one fast fire, later calls skip the node's checks and plan lookup; everything here checks that
the spike stays the reference's bit for bit, and that the hot path steps aside whenever what it
bound may have changed.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sj_sfn import SFNode, cpu, set_lambda
from sj_sfn import functional as F
from sj_sfn.cpu import kernels as K
from sj_sfn.neuron import _shaped_thresholds, reference_fire

pytestmark = pytest.mark.skipif(not cpu.available(), reason="the CPU fire kernel is unavailable (no C compiler)")


def _reference(node: SFNode, x: torch.Tensor) -> torch.Tensor:
    with reference_fire():
        return node(x)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


def _node(per_channel: bool = False, channel_dim: int | None = None) -> SFNode:
    if per_channel:
        tp, tn = torch.linspace(0.1, 0.5, 6), torch.linspace(0.3, 0.05, 6)
    else:
        tp, tn = torch.tensor(0.3), torch.tensor(0.2)
    return SFNode(tp, tn, levels=F.float_levels(3, 4, subnormal=True), offset=0.5, stateful=False, channel_dim=channel_dim)


@pytest.mark.parametrize(
    "layout",
    ["contiguous", "permuted", "per-channel last", "per-channel dim 1", "unsigned capped"],
)
def test_the_hot_path_fires_the_reference_bit_for_bit(layout: str, rng: torch.Generator) -> None:
    if layout == "per-channel last":
        node, shape = _node(True, -1), (4, 7, 6)
    elif layout == "per-channel dim 1":
        node, shape = _node(True, 1), (3, 6, 5, 4)
    elif layout == "unsigned capped":
        node, shape = SFNode(torch.tensor(0.25), levels=F.float_levels(2, 7), offset=0.5, ceiling=3.0, stateful=False), (5, 33)
    else:
        node, shape = _node(), (2, 3, 9, 8)
    with torch.no_grad():
        for i in range(4):  # the first call binds, the next ones take the hot path
            x = torch.randn(shape, generator=rng) * 2
            if layout == "permuted":
                x = x.transpose(1, 2)  # read in place, as attention's q/k/v
            out = node(x)
            hot = node.__dict__["_hot"](x)  # what the next call of this layout returns
            ref = _reference(node, x)
            assert _bits_equal(out, ref) and _bits_equal(hot, ref), f"call {i}"
            assert out.is_contiguous() and hot.is_contiguous()


def test_in_place_and_replaced_buffers_make_it_step_aside(rng: torch.Generator) -> None:
    node = _node()
    x = torch.randn(4, 50, generator=rng)
    with torch.no_grad():
        before = node(x)
        node(x)
        node.theta_pos.mul_(2)  # in place: the buffer's version moves
        assert _bits_equal(node(x), _reference(node, x)) and not torch.equal(node(x), before)
        set_lambda(node, 0.5)
        assert _bits_equal(node(x), _reference(node, x))
        node._buffers["theta_neg"] = torch.tensor(0.05)  # replaced without __setattr__
        out = node(x)
        assert _bits_equal(out, _reference(node, x)) and (out < 0).any()
        hot = node.__dict__["_hot"]  # bound anew for the new buffers, not left stale
        assert hot(x) is not None and _bits_equal(hot(x), out)


def test_attribute_changes_drop_it(rng: torch.Generator) -> None:
    node = _node()
    x = torch.randn(4, 50, generator=rng)
    with torch.no_grad():
        node(x)
        assert "_hot" in node.__dict__
        node.offset = 0.0
        assert "_hot" not in node.__dict__
        assert _bits_equal(node(x), _reference(node, x))
        node.store_counts = True  # counts asked for: the hot path must not skip them
        out = node(x)
        assert "_hot" not in node.__dict__ and node.last_counts is not None and node.last_counts.shape == x.shape
        assert _bits_equal(out, _reference(node, x))
        node.store_counts = False
        node(x)
        node.step_mode = "m"
        seq = torch.randn(3, 4, 50, generator=rng)
        assert _bits_equal(node(seq), _reference(node, seq))
        node.step_mode = "s"
        node(x)
        node.reset()  # clears the counts only: keeps the bound call
        assert "_hot" in node.__dict__


def test_other_dtypes_autograd_hooks_and_the_environment(rng: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    node = _node()
    x = torch.randn(4, 50, generator=rng)
    with torch.no_grad():
        node(x)
    assert "_hot" in node.__dict__
    # float64 input: the hot call steps aside, the node fires it in float64
    x64 = x.double()
    with torch.no_grad():
        assert node(x64).dtype == torch.float64 and torch.equal(node(x64), _reference(node, x64))
    # autograd: the straight-through gradient still flows
    xg = x.clone().requires_grad_()
    node(xg).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    # a forward hook still sees every output
    seen = []
    handle = node.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        out = node(x)
    handle.remove()
    assert len(seen) == 1 and seen[0] is out
    # the environment variable turns the kernel off for bound nodes too
    with torch.no_grad():
        node(x)
        hot = node.__dict__["_hot"]
        monkeypatch.setenv(K.ENV_VAR, "0")
        assert hot(x) is None
        assert _bits_equal(node(x), _reference(node, x))
        assert "_hot" not in node.__dict__  # nor bound anew while the kernel is off
        node(x)
        assert "_hot" not in node.__dict__
        monkeypatch.delenv(K.ENV_VAR)
        node(x)
        assert node.__dict__["_hot"](x) is not None  # bound again once it is back


def test_a_new_layout_binds_anew_and_copies_drop_it(rng: torch.Generator) -> None:
    node = _node(True, -1)
    with torch.no_grad():
        for shape in [(2, 6), (3, 5, 6), (2, 6), (1, 1, 6), (0, 6)]:
            x = torch.randn(shape, generator=rng)
            assert _bits_equal(node(x), _reference(node, x)), shape
        with pytest.raises(ValueError, match="theta"):  # thresholds that do not fit: the full path's error
            node(torch.randn(2, 5, generator=rng))
        twin = copy.deepcopy(node)
        buf = io.BytesIO()
        torch.save(node, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        assert "_hot" not in twin.__dict__ and "_hot" not in loaded.__dict__
        x = torch.randn(3, 6, generator=rng)
        assert _bits_equal(twin(x), node(x)) and _bits_equal(loaded(x), node(x))


@pytest.mark.parametrize("threads", [2, 3])
def test_the_hot_path_splits_across_threads(threads: int, rng: torch.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shares that start and end mid-row, on the bound call: still the reference's spike."""
    monkeypatch.setattr(K, "MIN_PER_THREAD", 7)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        node = _node(True, 1)
        with torch.no_grad():
            for _ in range(3):
                x = torch.randn(3, 6, 5, 7, generator=rng).transpose(2, 3)
                assert _bits_equal(node(x), _reference(node, x))
    finally:
        torch.set_num_threads(old)


def test_memory_order_and_the_kept_layout() -> None:
    def order(t: torch.Tensor):
        return K.memory_order(tuple(t.shape), t.stride())

    def kept(t: torch.Tensor):
        return K.kept_layout(tuple(t.shape), t.stride())

    x = torch.zeros(2, 3, 4, 5)
    assert order(x) == (0, 1, 2, 3) and kept(x) is None  # contiguous: written as it is
    cl = x.contiguous(memory_format=torch.channels_last)
    assert order(cl) == (0, 2, 3, 1) and kept(cl) == (0, 2, 3, 1)
    assert order(x.transpose(1, 2)) == (0, 2, 1, 3) and kept(x.transpose(1, 2)) is None  # rows contiguous: made contiguous
    assert order(x[:, :, :, ::2]) is None and order(x[:, :2]) is None  # gaps: not dense
    assert order(torch.zeros(4, 1).expand(4, 6)) is None  # stride 0: not dense
    assert K.memory_order((1, 7), (99, 1)) == (0, 1)  # a size-1 dimension's stride does not matter
    assert kept(torch.zeros(2, 3, 1, 1).contiguous(memory_format=torch.channels_last)) is None


@pytest.mark.parametrize("per_channel", [False, True])
def test_a_channels_last_input_gives_a_channels_last_spike(per_channel: bool, rng: torch.Generator) -> None:
    """As torch's elementwise operations: the convolution after the site runs in the ANN's layout, whichever path
    fired (a convolution may round differently on the other layout)."""
    node = _node(per_channel, 1 if per_channel else None)
    with torch.no_grad():
        for i in range(3):  # the first call (plan), then the hot path
            x = (torch.randn(2, 6, 5, 7, generator=rng) * 2).contiguous(memory_format=torch.channels_last)
            out = node(x)
            ref = _reference(node, x)
            assert out.stride() == x.stride() == ref.stride(), f"call {i}"  # the reference path returns it so too
            assert _bits_equal(out.contiguous(), ref.contiguous()), f"call {i}"
        y = x.clone(memory_format=torch.preserve_format)
        assert node.fire_inplace(y) is y and _bits_equal(y.contiguous(), ref.contiguous())
        q = torch.randn(2, 7, 6, 4, generator=rng).transpose(1, 2)  # [B, H, L, D] of a [B, L, H, D] projection
        # contiguous for the matrix product after it: on the first call (it binds), the hot path and the reference
        assert node(q).is_contiguous() and node(q).is_contiguous() and _reference(node, q).is_contiguous()


@pytest.mark.parametrize("channel_dim", [1, -3])
def test_the_torch_path_fires_a_channels_last_input_where_it_lies(channel_dim: int, rng: torch.Generator,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the C kernel, per-channel thresholds on a channels-last input fire it as [N·H·W, C] where it lies:
    the reference's bits in the input's layout, without copying it in or the spike back."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    monkeypatch.setenv(K.ENV_VAR, "0")
    node = _node(True, channel_dim)
    x = (torch.randn(2, 6, 5, 7, generator=rng) * 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = _reference(node, x)
        node(x)  # the plan
        with Ops() as ops:
            out = node(x)
    assert out.stride() == x.stride() and _bits_equal(out.contiguous(), ref.contiguous())
    copies = [n for n in ops.names if "copy" in n or "clone" in n]
    assert ops.names and not copies, copies


# -- firing in place (a caller's own temporary, as nn.ReLU(inplace=True)) ---------------------------------


def test_writable_in_place_needs_one_element_per_index() -> None:
    def writable(t: torch.Tensor) -> bool:
        return K.writable_in_place(t.shape, t.stride())

    base = torch.zeros(2, 5, 3, 4)
    assert writable(base) and writable(base.permute(0, 2, 1, 3)) and writable(base[:, 1:4, :, ::2])
    assert K.writable_in_place((1, 7), (99, 1))  # a size-1 dimension's stride does not matter
    assert not writable(torch.zeros(4, 1).expand(4, 6))
    assert not K.writable_in_place((3, 4), (2, 1))  # rows overlap


@pytest.mark.parametrize("per_channel", [False, True])
def test_the_kernel_fires_a_strided_view_in_place(per_channel: bool, rng: torch.Generator) -> None:
    """q of a fused [B, N, 3, H, D] projection, overwritten in place: the spike bit for bit, k and v untouched."""
    node = _node(per_channel, -1 if per_channel else None)
    qkv = torch.randn(2, 5, 3, 4, 6, generator=rng) * 2
    q = qkv.permute(2, 0, 3, 1, 4)[0]  # [B, H, N, D], strided
    with torch.no_grad():
        expected = _reference(node, q)
        node(q)  # builds the node's kernel plan
        fast = node._fast_plan()
        bound, address = fast["cpu"].bind(q, *_shaped_thresholds(fast, q, node.channel_dim))  # bound: kept alive
        rest = qkv[:, :, 1:].clone()
        out = fast["cpu"].fire_bound(q, address, 2, inplace=True)
    assert out is q and _bits_equal(q.contiguous(), expected)
    assert torch.equal(qkv[:, :, 1:], rest)


def test_fire_inplace_takes_only_the_hot_path(rng: torch.Generator) -> None:
    node = _node(True, -1)
    x = torch.randn(4, 7, 6, generator=rng)
    with torch.no_grad():
        assert node.fire_inplace(x.clone()) is None  # nothing bound yet: the caller calls the node
        expected = node(x)
        y = x.clone()
        version = y._version
        out = node.fire_inplace(y)
        assert out is y and _bits_equal(y, expected) and y._version > version
        wide = torch.randn(4, 1, 6, generator=rng).expand(4, 7, 6)  # one element for many indices: a new tensor
        out = node.fire_inplace(wide)
        assert out is not None and out.data_ptr() != wide.data_ptr() and _bits_equal(out, _reference(node, wide))
        with reference_fire():
            assert node.fire_inplace(x.clone()) is None
    assert node.fire_inplace(x.clone()) is None  # autograd on: never in place


def test_the_sformer_fire_skips_the_module_call_but_not_a_hook(rng: torch.Generator) -> None:
    """``sformer.modules.fire`` takes the node's bound call (:meth:`SFNode.fire_fast`) directly, with the forward's
    bits; a hook on the node (SpikingJelly's monitors register one) still sees every call."""
    from sj_sfn.sformer.modules import fire

    node = _node(True, -1)
    x = torch.randn(4, 7, 6, generator=rng)
    x0, seen = x.clone(), []
    with torch.no_grad():
        assert node.fire_fast(x) is None  # nothing bound yet: fire() calls the node
        expected = node(x)
        out = node.fire_fast(x)
        assert out is not None and out is not x and _bits_equal(out, expected)
        assert _bits_equal(fire(node, x), expected) and torch.equal(x, x0)
        handle = node.register_forward_hook(lambda m, args, output: seen.append(output))
        out = fire(node, x)
        y = x.clone()
        inplace = fire(node, y, inplace=True)
        handle.remove()
    assert len(seen) == 2 and seen[0] is out and _bits_equal(out, expected)
    assert inplace is not y and torch.equal(y, x)  # a hooked node fires out of place: the hook may keep its input
    with torch.no_grad(), reference_fire():
        assert node.fire_fast(x) is None
    assert node.fire_fast(x) is None  # autograd on


def test_the_sformer_fire_calls_a_subclass_forward(rng: torch.Generator) -> None:
    """A subclass of SFNode with its own ``forward`` is called, not bypassed by the bound kernel call."""
    from sj_sfn.sformer.modules import fire

    class Doubled(SFNode):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    node = Doubled(torch.tensor(0.3), torch.tensor(0.2), levels=F.float_levels(3, 4, subnormal=True), offset=0.5, stateful=False)
    x = torch.randn(4, 7, 6, generator=rng)
    with torch.no_grad():
        expected = node(x)
        node(x)  # a bound call exists from here on
        assert _bits_equal(fire(node, x), expected) and _bits_equal(fire(node, x.clone(), inplace=True), expected)
        assert node.fire_fast(x) is None and node.fire_inplace(x.clone()) is None
        assert _bits_equal(expected, 2 * SFNode.forward(node, x)) and _bits_equal(expected, _reference(node, x))


def test_sformer_fires_its_own_temporaries_in_place_and_nothing_else(rng: torch.Generator) -> None:
    """A converted ViT leaves its input alone, gives the reference's output, and a hook on a module that makes a
    site's input keeps what that module returned."""
    import timm

    import sj_sfn

    torch.manual_seed(0)
    ann = timm.create_model("test_vit", img_size=32, num_classes=5).eval()
    calib = [torch.randn(4, 3, 32, 32, generator=rng) for _ in range(2)]
    snn = sj_sfn.convert(ann, calib, progress=False)
    x = torch.randn(2, 3, 32, 32, generator=rng)
    with torch.no_grad():
        snn(x)  # binds every site
        kept = x.clone()
        out = snn(x)
        assert torch.equal(x, kept)
        with reference_fire():
            assert _bits_equal(out, snn(x))
        mlp = snn.blocks[0].mlp
        seen = []
        handle = mlp.act.register_forward_hook(lambda m, a, o: seen.append((o, o.clone())))
        try:
            assert _bits_equal(snn(x), out)
        finally:
            handle.remove()
        assert torch.equal(seen[0][0], seen[0][1])  # the GELU's output was not overwritten by the fc2_in site
        site = mlp.sfn_fc2_in  # without the hook, that site does fire over the GELU's output
        assert site.fire_inplace(seen[0][1]) is seen[0][1]
        # q's spikes are scaled in place (a tensor the site made); a hook on the site keeps the spikes it saw
        attn = snn.blocks[0].attn
        seen.clear()
        handle = attn.sfn_q.register_forward_hook(lambda m, a, o: seen.append((o, o.clone())))
        try:
            assert _bits_equal(snn(x), out)
        finally:
            handle.remove()
        assert torch.equal(seen[0][0], seen[0][1])
