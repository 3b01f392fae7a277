"""Datasets in their on-disk formats, the class-incremental protocol, transforms and prompts.
Knows nothing of models.

    train_tf, test_tf = build_transforms(image_size, mean, std, cfg.data.train_augment)
    train_ds, test_ds = build_datasets(cfg.data, train_tf, test_tf)
    scenario = ClassIncrementalScenario.from_config(cfg.data, train_ds, test_ds)
    prompts = format_prompts(scenario.class_names, cfg.data.templates)
"""
from .base import ClassDataset, ClassSubset, DatasetFormatError
from .build import DATASETS, build_datasets, cap_per_class
from .prompts import TEMPLATE_SETS, format_prompts, resolve_templates
from .protocol import ClassIncrementalScenario, resolve_class_order, split_tasks
from .transforms import build_transforms, clip_test_transform, clip_train_transform

__all__ = [
    "ClassDataset", "ClassSubset", "DatasetFormatError", "DATASETS", "build_datasets", "cap_per_class",
    "TEMPLATE_SETS", "format_prompts", "resolve_templates", "ClassIncrementalScenario",
    "resolve_class_order", "split_tasks", "build_transforms", "clip_test_transform", "clip_train_transform",
]
