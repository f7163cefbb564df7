"""Tune the SFN scaling factor λ by Bayesian optimisation with Ax (docs/method.md, "Tuning λ").

A converted network is calibrated once; a trial only rescales its thresholds
(:func:`~sj_sfn.neuron.set_lambda`, ``θ_i = λ·θ·y_i``) and makes one pass over the validation
loader, which yields the metric (top-1 accuracy in percent by default) and the energy ratio
``E_SNN / E_ANN`` (:func:`~sj_sfn.energy.measure_energy`) together. Objectives:

- ``'accuracy'``: maximise ``metric`` (ties go to the lower energy ratio);
- ``'tradeoff'``: maximise ``metric − β · energy_ratio``;
- ``'pareto'``: both objectives; the result holds the non-dominated trials.

The search runs over ``log λ`` in ``bounds`` (Ax ``RangeParameterConfig(scaling='log')``), one
dimension per λ group. Ax is an optional dependency: ``pip install 'sj-sfn[tune]'``.

Modules: :mod:`~sj_sfn.tune.search` (``tune_lambda``, ``evaluate_lambda``, groups),
:mod:`~sj_sfn.tune.result` (``Trial``, ``TuneResult``, ``pareto_front``), :mod:`~sj_sfn.tune.plot`.
"""

from __future__ import annotations

from .result import Trial, TuneResult, pareto_front
from .search import OBJECTIVES, Metric, current_lams, evaluate_lambda, site_groups, tune_lambda

__all__ = ["OBJECTIVES", "Metric", "Trial", "TuneResult", "tune_lambda", "pareto_front", "evaluate_lambda", "site_groups",
           "current_lams"]
