"""Data sets for dpcore: loaders return DataSplits of lazy ImageLists; `materialize` decodes them once."""
from dpcore.data.base import DataSplits, ImageList, hash_file_signatures
from dpcore.data.images import ArrayImageList, PathImageList, open_image, to_rgb
from dpcore.data.materialize import Materialized, materialize
from dpcore.data.registry import DATASETS, DatasetInfo, list_datasets, load_dataset

__all__ = ["DATASETS", "ArrayImageList", "DataSplits", "DatasetInfo", "ImageList", "Materialized",
           "PathImageList", "hash_file_signatures", "list_datasets", "load_dataset", "materialize", "open_image", "to_rgb"]
