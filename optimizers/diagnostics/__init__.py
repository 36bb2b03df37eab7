"""Curvature diagnostics on an ``Objective``: spectra, traces, spectral densities, Taylor tests, loss surfaces and
the gradient check. Every function returns a small record (``to_dict()`` for JSON, ``scalars()`` for metrics) that
includes its cost in products, gradients, loss evaluations and seconds; random draws come from a private generator
(``seed``), never from the global RNG. No Hydra, no runner: usable on any model::

    from optimizers import Objective
    from optimizers import diagnostics as diag
    obj = Objective(model, "cross_entropy", x, y)
    top = diag.eigenpairs(obj, k=5, curvature="hessian")          # Lanczos; top.eigenvalues, top.eigenvectors
    tr = diag.hutchinson_trace(obj, num_probes=100)               # tr.trace, tr.stderr
    taylor = diag.taylor_test(obj, direction=top.eigenvectors[0]) # taylor.slopes ~ (1, 2, 3)
    surf = diag.loss_surface(obj, top.eigenvectors[:2], alphas, betas)

Modules: ``operators`` (H or G as a counted linear operator), ``lanczos`` (the Krylov engine), ``spectrum``
(eigenpairs), ``trace`` (Hutchinson, diagonal, Hutch++), ``density`` (stochastic Lanczos quadrature), ``taylor``,
``surface``, ``gradcheck``, ``plots`` (matplotlib figures from the records), ``results`` (records and costs),
``isolation`` (``with isolated(model):`` leaves buffers, gradients and the global RNG as they were).
"""
from optimizers.diagnostics.density import SpectralDensity, spectral_density
from optimizers.diagnostics.gradcheck import GradientCheck, finite_difference_check, gradient_check
from optimizers.diagnostics.isolation import isolated
from optimizers.diagnostics.operators import CurvatureOperator, MatrixOperator, as_operator
from optimizers.diagnostics.results import Cost, Record
from optimizers.diagnostics.spectrum import Eigenpairs, eigenpairs, lanczos_eigenpairs, power_iteration
from optimizers.diagnostics.surface import (LossLine, LossSurface, filter_normalized_direction, loss_line,
                                            loss_surface)
from optimizers.diagnostics.taylor import TaylorTest, taylor_test
from optimizers.diagnostics.trace import (DiagonalEstimate, TraceEstimate, hutchinson_diagonal, hutchinson_trace,
                                          hutchpp_trace)

__all__ = [
    "Cost", "Record", "isolated", "CurvatureOperator", "MatrixOperator", "as_operator",
    "Eigenpairs", "eigenpairs", "lanczos_eigenpairs", "power_iteration",
    "TraceEstimate", "DiagonalEstimate", "hutchinson_trace", "hutchinson_diagonal", "hutchpp_trace",
    "SpectralDensity", "spectral_density", "TaylorTest", "taylor_test",
    "LossLine", "LossSurface", "filter_normalized_direction", "loss_line", "loss_surface",
    "GradientCheck", "gradient_check", "finite_difference_check",
]
