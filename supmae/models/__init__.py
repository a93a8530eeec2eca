"""The SupMAE network and its named variants.

`create_model(name, **overrides)` builds a registered variant; `list_models()` names them.
"""

from supmae.models.registry import create_model, list_models, model_defaults
from supmae.models.supmae import SupMAE, SupMAEOutput

__all__ = ["SupMAE", "SupMAEOutput", "create_model", "list_models", "model_defaults"]
