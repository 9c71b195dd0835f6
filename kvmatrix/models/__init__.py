"""The embedded default models: presets, deterministic generation, the model cache.

Host code uses ``ensure_model``; nothing here imports torch (generation runs
in the "model" venv, see generate.py).
"""

from kvmatrix.models.presets import PRESETS, ModelPreset, get_preset, param_count
from kvmatrix.models.store import ModelFiles, ensure_model, model_python

__all__ = ["PRESETS", "ModelPreset", "ModelFiles", "ensure_model", "get_preset", "model_python", "param_count"]
