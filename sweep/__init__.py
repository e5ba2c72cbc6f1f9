"""HYPER: find the fastest Whisper that is still accurate enough.

The evaluation core (models, data, recipe, compress, scoring, evaluate) imports neither Ray nor
MLflow, so it runs on a bare GPU machine with only torch and transformers.
"""

__version__ = "0.1.0"
