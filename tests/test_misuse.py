"""API misuse gets a clear error naming the problem at the boundary (``sj_sfn.convert``, ``SFNRecipe``,
``MTNRecipe``, ``sformer.convert``), or, for a single input tensor, a documented meaning: one calibration batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from spikingjelly.activation_based.ann2snn import Converter

import sj_sfn
from sj_sfn import sformer
from sj_sfn.ann2snn import MTNRecipe, SFNRecipe

OPTS = dict(lam=0.1, progress=False)  # λ given: these tests are about the arguments, not λ's default


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 5)).eval()


def _x(rng: torch.Generator, n: int = 8) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=rng)


def test_a_tensor_is_one_calibration_batch(rng):
    """``convert(model, x)`` calibrates on the batch ``x``: the same network (same thresholds) as ``convert(model, [x])``."""
    ann, x = _cnn(), _x(rng)
    a = sj_sfn.convert(ann, x, **OPTS)
    b = sj_sfn.convert(ann, [x], **OPTS)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0)
        else:  # extra state (a site's kind)
            assert sa[k] == sb[k]
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_a_tensor_is_one_batch_for_the_recipes_too(rng):
    ann, x = _cnn(), _x(rng)
    snn = Converter(SFNRecipe(x, progress=False)).convert(ann)
    ref = Converter(SFNRecipe([x], progress=False)).convert(ann)
    torch.testing.assert_close(snn(x), ref(x), rtol=0, atol=0)
    mtn = Converter(MTNRecipe(x.abs(), time_steps=8)).convert(ann)
    assert mtn(x).shape == (8, 5)


@pytest.mark.parametrize("pair", ["tuple", "list"])
def test_a_lone_x_y_pair_is_an_error_that_says_so(rng, pair):
    x, y = _x(rng), torch.randint(0, 5, (8,), generator=rng)
    batch = (x, y) if pair == "tuple" else [x, y]
    with pytest.raises(TypeError, match=r"looks like ONE \(x, y\) batch.*\[\(x, y\)\]"):
        sj_sfn.convert(_cnn(), batch, **OPTS)
    # wrapped, it is a loader of one batch
    assert sj_sfn.convert(_cnn(), [(x, y)], **OPTS)(x).shape == (8, 5)


def test_a_list_of_input_batches_is_still_a_loader(rng):
    ann = _cnn()
    xs = [_x(rng), _x(rng)]
    snn = sj_sfn.convert(ann, xs, **OPTS)
    assert snn(xs[0]).shape == (8, 5)


@pytest.mark.parametrize("bad", [3, "data/", 1.5])
def test_a_non_iterable_loader_is_named(bad):
    with pytest.raises(TypeError, match=r"dataloader must be an iterable of batches.*got (int|str|float)"):
        sj_sfn.convert(_cnn(), bad, **OPTS)


def test_no_loader_is_named():
    with pytest.raises(ValueError, match="needs a calibration dataloader"):
        sj_sfn.convert(_cnn(), None, **OPTS)


def test_an_already_converted_network_is_named(rng):
    x = _x(rng)
    snn = sj_sfn.convert(_cnn(), [x], **OPTS)
    with pytest.raises(ValueError, match=r"already converted: it has SFNode sites"):
        sj_sfn.convert(snn, [x], **OPTS)
    with pytest.raises(ValueError, match=r"already converted: it has SFNode sites"):
        Converter(SFNRecipe([x], progress=False)).convert(snn)


def test_an_mtn_network_is_named_too(rng):
    x = _x(rng).abs()
    mtn = Converter(MTNRecipe([x], time_steps=4)).convert(_cnn())
    with pytest.raises(ValueError, match=r"already converted: it has MTNode sites"):
        sj_sfn.convert(mtn, [x], **OPTS)


def test_a_model_on_the_meta_device_is_named(rng):
    with torch.device("meta"):
        ann = _cnn()
    with pytest.raises(ValueError, match=r"meta device.*'0\.weight'.*to_empty"):
        sj_sfn.convert(ann, [_x(rng)], **OPTS)
    with pytest.raises(ValueError, match=r"meta device"):
        Converter(SFNRecipe([_x(rng)], progress=False), device="cpu").convert(ann)


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU()), nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))],
    ids=["relu-only", "bn-relu-pool"],
)
def test_a_model_without_a_weight_layer_is_named(rng, model):
    with pytest.raises(ValueError, match=r"no weight layer \(no Conv, Linear"):
        sj_sfn.convert(model, [_x(rng)], **OPTS)


def test_not_a_module_is_named(rng):
    with pytest.raises(TypeError, match=r"model must be an nn.Module, got function"):
        sj_sfn.convert(lambda x: x, [_x(rng)], **OPTS)


def test_sformer_entry_checks_the_same(rng):
    timm = pytest.importorskip("timm")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                            num_classes=3).eval()
    x = torch.randn(2, 3, 16, 16, generator=rng)
    snn = sformer.convert(vit, x, progress=False)  # a tensor is one batch here as well
    assert snn(x).shape == (2, 3)
    with pytest.raises(ValueError, match="already converted"):
        sformer.convert(snn, [x], progress=False)
    with pytest.raises(TypeError, match=r"looks like ONE \(x, y\) batch"):
        sformer.convert(vit, (x, torch.tensor([0, 1])), progress=False)
