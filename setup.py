"""The package list, found on disk (everything else is in pyproject.toml).

smclm's subpackages and the Hydra config folders in configs/, installed as smclm.configs and its
sub-folders: listing each folder as a package is what lets setuptools ship their YAML files
without a "Package would be ignored" warning, and a new config group needs no edit here.
"""

from setuptools import find_namespace_packages, find_packages, setup

setup(
    packages=[
        *find_packages(include=["smclm", "smclm.*"]),
        "smclm.configs",
        *(f"smclm.configs.{p}" for p in find_namespace_packages("configs")),
    ],
)
