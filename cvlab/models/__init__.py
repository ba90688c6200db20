"""Model zoo. Importing this package registers every model module in its sub-packages."""
import importlib
import pkgutil

from cvlab.models._registry import create_model, list_models, model_task, register_model

_FAMILIES = ("backbones", "necks", "heads", "detectors", "segmentors", "generators", "anomaly")

for _family in _FAMILIES:
    _package = importlib.import_module(f"{__name__}.{_family}")
    for _module in pkgutil.iter_modules(_package.__path__):
        importlib.import_module(f"{_package.__name__}.{_module.name}")

__all__ = ["create_model", "list_models", "model_task", "register_model"]
