"""Calibration: per-site activation statistics (observers) and threshold / level selection."""

from .observers import CalibrationError, SiteObserver, batch_inputs, calibrate, observers

__all__ = ["SiteObserver", "observers", "calibrate", "batch_inputs", "CalibrationError"]
