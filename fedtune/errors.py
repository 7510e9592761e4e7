"""The exceptions fedtune raises, so callers can tell a bad config from a bad reply."""

from __future__ import annotations


class FedtuneError(Exception):
    """Base class of every error fedtune raises on purpose."""


class ConfigError(FedtuneError, ValueError):
    """One or more problems in a configuration, reported together.

    Parameters
    ----------
    problems : list of str
        Each problem names the key, the value received and the fix.
    """

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class ModelLoadError(FedtuneError):
    """A model or tokenizer could not be loaded."""


class DataError(FedtuneError, ValueError):
    """A data set could not be read or does not have the expected columns."""


class InvalidUpdateError(FedtuneError, ValueError):
    """A client reply breaks the contract (keys, shapes, dtypes, non-finite values)."""


class AggregationError(FedtuneError):
    """Aggregation cannot produce a valid global state (e.g. no valid replies)."""
