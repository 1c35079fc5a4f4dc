"""Data sets for dpcore: loaders return DataSplits of lazy ImageLists; `materialize` decodes them once."""
from .base import DataSplits, ImageList, hash_file_signatures
from .images import ArrayImageList, PathImageList, open_image, to_rgb
from .materialize import Materialized, materialize
from .registry import DATASETS, DatasetInfo, list_datasets, load_dataset

__all__ = ["DATASETS", "ArrayImageList", "DataSplits", "DatasetInfo", "ImageList", "Materialized",
           "PathImageList", "hash_file_signatures", "list_datasets", "load_dataset", "materialize", "open_image", "to_rgb"]
