"""The one optional C extension, ``common._speedups`` (everything else is in pyproject.toml).

``optional=True``: without a C compiler the install still succeeds, and ``common.events`` uses
its pure-Python versions of the same two functions (see common/_speedups.c for why it exists).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("common._speedups", ["common/_speedups.c"], optional=True),
    ]
)
