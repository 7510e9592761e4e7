"""The exceptions fedtune raises, so callers can tell a bad config from a bad reply."""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose."""


class ConfigError(FedtuneError, ValueError):
    """One or more problems in a configuration, reported together.

    Parameters
    ----------
    problems : list of str, or str
        Each problem names the key, the value received and the fix. A single string is
        one problem.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class ModelLoadError(FedtuneError):
    """A model or tokenizer could not be loaded."""


class CheckpointError(FedtuneError):
    """A checkpoint was refused: content the safe loader does not build, or another format."""


class DataError(FedtuneError, ValueError):
    """A data set could not be read or does not have the expected columns."""


class InvalidUpdateError(FedtuneError, ValueError):
    """A client reply breaks the contract (keys, shapes, dtypes, non-finite values)."""


class AggregationError(FedtuneError):
    """Aggregation cannot produce a valid global state (e.g. no valid replies)."""


class ClientAppError(FedtuneError):
    """A client's ClientApp raised an exception: the run stops, since it would fail again."""


class NothingAggregatedError(AggregationError):
    """Every round of a run was skipped: the global model never changed."""


class RunInterrupted(FedtuneError):
    """The run was stopped on request (Ctrl-C) after its last complete round."""
