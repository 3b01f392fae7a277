"""Datasets in their on-disk formats, the class-incremental protocol, transforms and prompts.
Knows nothing of models.

    train_tf, test_tf = build_transforms(image_size, mean, std, cfg.data.train_augment)
    train_ds, test_ds = build_datasets(cfg.data, train_tf, test_tf)
    scenario = ClassIncrementalScenario.from_config(cfg.data, train_ds, test_ds)
    prompts = format_prompts(scenario.class_names, cfg.data.templates)
"""
from .._lazy import lazy_getattr

# imported on first use (PEP 562): base and transforms import torch and torchvision, which a config
# check (config.py reads the template set names from prompts.py) does not need
_LAZY = {
    "ClassDataset": ".base", "ClassSubset": ".base", "DatasetFormatError": ".base",
    "DATASETS": ".build", "build_datasets": ".build", "cap_per_class": ".build",
    "TEMPLATE_SETS": ".prompts", "format_prompts": ".prompts", "resolve_templates": ".prompts",
    "ClassIncrementalScenario": ".protocol", "resolve_class_order": ".protocol", "split_tasks": ".protocol",
    "build_transforms": ".transforms", "clip_test_transform": ".transforms", "clip_train_transform": ".transforms",
}
__getattr__ = lazy_getattr(__name__, _LAZY)

__all__ = list(_LAZY)
