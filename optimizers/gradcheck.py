"""Moved to ``optimizers.diagnostics.gradcheck`` (the curvature-diagnostics family); re-exported here."""
from optimizers.diagnostics.gradcheck import GradientCheck, finite_difference_check, gradient_check

__all__ = ["GradientCheck", "finite_difference_check", "gradient_check"]
