"""Dagster resources: where things live, which recipe, which device, where runs are tracked."""

from resources.device import DeviceResource
from resources.io_manager import AtomicFilesystemIOManager
from resources.mlflow_tracking import MLflowTracking
from resources.storage import RecipeResource, TVEStorage

__all__ = [
    "AtomicFilesystemIOManager",
    "DeviceResource",
    "MLflowTracking",
    "RecipeResource",
    "TVEStorage",
]
