"""Fitting the wind-tunnel laws: pure numpy/scipy functions from study results to laws.

Each fit returns a frozen dataclass with the fitted parameters, residuals and goodness of fit,
`params()` for the bootstrap and `to_dict(**provenance)` for JSON. By study (MiniCPM,
arXiv 2404.06395):
- learning rate, "Optimal Learning Rate" (lr.py): `fit_lr_optimum`, `lr_drift`
- batch size, "Optimal Batch Size" (batch.py): `tokens_to_reach`, `optimal_batch_for_loss`,
  `fit_bs_law`, `predict_bs`
- scaling, "Measuring the Scaling Law with WSD LRS": `envelope`, `fit_power_law`,
  `fit_exponential`, `predict_loss` (scaling.py); `fit_loss_nd`, `compute_optimal_ratio`
  (loss_nd.py)
- uncertainty of any of them (bootstrap.py): `bootstrap`
Bad inputs (too few points, NaN where a value is required, non-positive values whose log is
taken) raise ValueError saying which argument and value, and what is allowed.
"""

from sandbox_service.laws._fit import Fit
from sandbox_service.laws.batch import (
    BatchOptimum,
    BatchSizeLaw,
    fit_bs_law,
    optimal_batch_for_loss,
    predict_bs,
    tokens_to_reach,
)
from sandbox_service.laws.bootstrap import BootstrapResult, bootstrap
from sandbox_service.laws.loss_nd import ComputeOptimal, LossND, compute_optimal_ratio, fit_loss_nd
from sandbox_service.laws.lr import LRDrift, LROptimum, fit_lr_optimum, lr_drift
from sandbox_service.laws.scaling import (
    Envelope,
    ExponentialLaw,
    PowerLaw,
    envelope,
    fit_exponential,
    fit_power_law,
    predict_loss,
)

__all__ = [
    "BatchOptimum",
    "BatchSizeLaw",
    "BootstrapResult",
    "ComputeOptimal",
    "Envelope",
    "ExponentialLaw",
    "Fit",
    "LRDrift",
    "LROptimum",
    "LossND",
    "PowerLaw",
    "bootstrap",
    "compute_optimal_ratio",
    "envelope",
    "fit_bs_law",
    "fit_exponential",
    "fit_loss_nd",
    "fit_lr_optimum",
    "fit_power_law",
    "lr_drift",
    "optimal_batch_for_loss",
    "predict_bs",
    "predict_loss",
    "tokens_to_reach",
]
