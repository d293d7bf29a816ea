"""Factorized-Dreamer library: models, noise schedule, encoders, video I/O, sampling, metrics.

Knows nothing about Ray: the job folders (``pipelines/``, ``training/``, ``serving/``) wrap it.
"""

__version__ = "0.1.0"
