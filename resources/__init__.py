"""Dagster resources: where things live, which recipe, which device, where runs are tracked."""

from resources.device import DeviceResource
from resources.mlflow_tracking import MLflowTracking
from resources.storage import RecipeResource, TVEStorage

__all__ = ["DeviceResource", "MLflowTracking", "RecipeResource", "TVEStorage"]
