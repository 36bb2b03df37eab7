"""Checks of user-facing options, shared by every layer (data, models, optimizers, runner); imports no torch.

``validation.checks`` holds the checks and the ``Options`` record machinery: see its docstring.
"""
