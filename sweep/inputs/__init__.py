"""Data and model: evaluation sets, model loading (hub, local, the embedded CTranslate2
whisper-base), the cache of converted models, the model and data CLI flags."""
