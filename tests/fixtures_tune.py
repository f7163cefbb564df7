"""Session fixtures for λ tuning: converted digits CNN and ViT, and a search loader."""

from __future__ import annotations

import copy

import pytest
from torch.utils.data import ConcatDataset, DataLoader

import sj_sfn


@pytest.fixture(scope="session")
def tune_search_loader(cnn_digits_splits):
    """Train + validation digits (1,438 images, never the test split) for the search tests.

    The search tests check the optimiser, not generalisation: the larger set makes accuracy
    against λ smoother (one image = 0.07 points instead of 0.56 on the 180-image split).
    """
    ds = ConcatDataset([cnn_digits_splits.train, cnn_digits_splits.val])
    return DataLoader(ds, batch_size=512, shuffle=False)


@pytest.fixture(scope="session")
def tune_cnn_snn(cnn_digits_model, cnn_digits_splits):
    """The session's digits CNN converted at T=1 with the paper's quantile thresholds (λ=0.05, N=32, p=0.99): the λ
    search runs in the paper's range (0.05, 1)."""
    return sj_sfn.convert(cnn_digits_model, cnn_digits_splits.loader("train", 128, shuffle=False), lam=0.05,
                          progress=False).eval()


@pytest.fixture(scope="session")
def tune_vit_snn(vit_digits_snn):
    """A private copy of the session's digits SFormer (λ=0.25, N=32), so tuning never races other tests."""
    return copy.deepcopy(vit_digits_snn).eval()


@pytest.fixture(scope="session")
def tune_cnn_result(tune_cnn_snn, tune_search_loader):
    """15 BO trials (accuracy objective, seed 0) on the digits CNN."""
    from sj_sfn.tune import tune_lambda

    return tune_lambda(tune_cnn_snn, tune_search_loader, trials=15, seed=0, progress=False)
