"""Diagnostics beyond the ELBO: importance-weighted bounds, PSIS k-hat, memory caps, export, plots."""

from .diagnose import Diagnostics, check_settings, diagnose

__all__ = ["Diagnostics", "check_settings", "diagnose"]
