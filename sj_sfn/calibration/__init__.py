"""Calibration: per-site activation statistics (observers) and threshold / level selection."""

from .budget import Allocation, allocate_thresholds
from .observers import CalibrationError, SiteObserver, batch_inputs, calibrate, observers
from .reconstruction import DEFAULT_RECONSTRUCTION_STEPS, Reconstruction, reconstruct

__all__ = ["SiteObserver", "observers", "calibrate", "batch_inputs", "CalibrationError", "allocate_thresholds", "Allocation",
           "reconstruct", "Reconstruction", "DEFAULT_RECONSTRUCTION_STEPS"]
