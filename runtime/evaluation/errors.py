"""The errors of evaluation: the user's to fix (`common.errors.UserError`), ValueErrors too."""
from __future__ import annotations

from common.errors import UserError
from common.params import ParameterError


class EvaluationError(UserError, ValueError):
    """Evaluation cannot run as asked; the message says what is wrong and what to do."""


class EvaluationParameterError(EvaluationError, ParameterError):
    """An evaluation setting outside what the plan accepts."""
