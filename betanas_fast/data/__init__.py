"""Search data: the weight-train / held-out (for alpha) / validation splits and their batch order.

A data source is anything with the `ImageSplit` interface; the embedded demo (scikit-learn digits)
keeps whole splits as tensors. An ImageNet folder or DALI source plugs in through `register_dataset`.
"""
from .base import (EMBEDDED, BatchOrder, Dataset, ImageSplit, SearchData, TensorSplit, build_data, dataset_names, get_dataset,
                   load_test_split, register_dataset, validate_labels)
from .digits import load_digits_data

__all__ = ["EMBEDDED", "BatchOrder", "Dataset", "ImageSplit", "SearchData", "TensorSplit", "build_data", "dataset_names",
           "get_dataset", "load_test_split", "register_dataset", "validate_labels", "load_digits_data"]
