"""The errors of probes: all are the user's to fix (`common.errors.UserError`), and ValueErrors
too, as they always were."""
from __future__ import annotations

from common.errors import UserError
from common.params import ParameterError


class ProbeError(UserError, ValueError):
    """A probe cannot be made, read, applied or fused as asked; the message says why."""


class ProbeParameterError(ProbeError, ParameterError):
    """A probe hyper-parameter outside what the probe's kind accepts."""


class ProbeFileError(ProbeError):
    """A probe folder that cannot be loaded; the message names the file and the problem."""


class ProbeMismatchError(ProbeError):
    """A probe that was not fitted on this backbone (feature dimension or fingerprint); keeps
    the probe folder, the model and the reason apart, for callers that word it their way."""

    def __init__(self, probe_dir: str, model: str, reason: str):
        self.probe_dir, self.model, self.reason = str(probe_dir), str(model), reason
        super().__init__(f"probe {probe_dir} does not match model {model}: {reason}")


class FuseError(ProbeError):
    """The probe cannot be fused into this model; the message says why and what to do."""
