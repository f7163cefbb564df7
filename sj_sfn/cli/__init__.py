"""The ``sj-sfn`` command: ``demo``, ``convert``, ``eval``, ``tune``, ``info``, ``theorem``.

    sj-sfn demo                                   # digits: train a CNN and a ViT, convert at T=1, tune λ
    sj-sfn convert zoo:digits_cnn --checkpoint cnn.pth --data digits --tune --out snn.pth
    sj-sfn eval snn.pth --data digits --json eval.json
    sj-sfn tune snn.pth --data digits --trials 20 --json tune.json --plot tune.png
    sj-sfn info

MODEL is a timm model name, ``torchvision:NAME`` or ``zoo:NAME`` (``digits_cnn``,
``digits_vit``, ``small_resnet``); ``--data`` is ``digits``, ``fashion-mnist`` or an
ImageFolder tree (``DIR/train`` + ``DIR/val`` as for ImageNet, or one folder that is split).
λ is tuned on a validation split cut from the training data, never on the test split.
Every user error ends with exit code 2 and a one-line reason, before any work when it is an
output path; ``SJ_SFN_TRACEBACK=1`` shows the traceback instead. Under ``torchrun`` calibration,
λ tuning and evaluation are split across the processes (see :mod:`sj_sfn.distributed`).

One module per subcommand (argparse and calls into the library): the model factory is
:func:`sj_sfn.zoo.build_model`, data sets and splits :mod:`sj_sfn.data`, checkpoints and
converted files :mod:`sj_sfn.io`, accuracy and energy :mod:`sj_sfn.evaluation`.
"""

from __future__ import annotations

from ..data import data_config, data_info, load_data
from ..io import load_converted, save_converted
from ..utils import UserError
from ..zoo import build_model
from .main import build_parser, main, run_guarded

__all__ = ["main", "build_parser", "run_guarded", "UserError", "build_model", "load_data", "data_info", "data_config", "load_converted",
           "save_converted"]
