"""Datasets, few-shot sampling, transforms and image loading (DESIGN.md section 3)."""

from pmpo.data.datasets import (
    BENCHMARK_DATASETS,
    DATASETS,
    DOMAIN_SHIFT_DATASETS,
    DatasetSplits,
    Datum,
    build_dataset,
    clean_classname,
    dataset_templates,
    list_datasets,
    resolve_dataset_name,
)
from pmpo.data.fewshot import (
    base_new_labels,
    few_shot_cache_path,
    harmonic_mean,
    parse_shots,
    sample_few_shot,
    split_fingerprint,
    subsample_classes,
)
from pmpo.data.loader import MAX_IMAGE_PIXELS, ImageDataset, load_image
from pmpo.data.transforms import CLIP_MEAN, CLIP_STD, ToRGB, build_transform

__all__ = [
    "BENCHMARK_DATASETS",
    "CLIP_MEAN",
    "CLIP_STD",
    "DATASETS",
    "DOMAIN_SHIFT_DATASETS",
    "DatasetSplits",
    "Datum",
    "ImageDataset",
    "MAX_IMAGE_PIXELS",
    "ToRGB",
    "base_new_labels",
    "build_dataset",
    "build_transform",
    "clean_classname",
    "dataset_templates",
    "few_shot_cache_path",
    "harmonic_mean",
    "list_datasets",
    "load_image",
    "parse_shots",
    "resolve_dataset_name",
    "sample_few_shot",
    "split_fingerprint",
    "subsample_classes",
]
