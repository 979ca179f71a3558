"""The optional C extensions (everything else is in pyproject.toml).

``optional=True``: without a C compiler the install still succeeds, and the code uses the
pure-Python versions of the same functions (each .c file says why it exists):

* ``common._speedups`` -- creating and validating Events, the base bus's delivery loop;
* ``level_4_hard.file_kafka._appender`` -- a file-Kafka producer's per-record append.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("common._speedups", ["common/_speedups.c"], optional=True),
        Extension(
            "level_4_hard.file_kafka._appender",
            ["level_4_hard/file_kafka/_appender.c"],
            optional=True,
        ),
    ]
)
