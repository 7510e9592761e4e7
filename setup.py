"""The package list, found rather than written out: fedtune's rooms and every method folder under
strategies/, which installs as fedtune.strategies (pyproject.toml's package-dir). Everything else
is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["fedtune", "fedtune.*"]), "fedtune.strategies",
                *(f"fedtune.strategies.{name}" for name in find_packages("strategies"))])
