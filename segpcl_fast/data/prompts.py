"""Prompt templates: named sets and formatting. A template is a string with one '{}' where the
class name goes. `data.templates` may list templates and/or set names (expanded here).

    resolve_templates(["clip_default"])        -> ["a good photo of a {}."]
    resolve_templates("cub200")                 -> ["a photo of a {}, a type of bird."]
    format_prompts(["cat", "dog"], ["a photo of a {}."]) -> [["a photo of a cat."], ["a photo of a dog."]]

Sources: OpenAI CLIP's prompt engineering (the 80 ImageNet templates, the CIFAR-100 and UCF101
ensembles, the bird template used for CUB) and CoOp's single UCF101 template.
"""
from __future__ import annotations

from typing import Sequence, Union

OPENAI_IMAGENET = [
    'a bad photo of a {}.',
    'a photo of many {}.',
    'a sculpture of a {}.',
    'a photo of the hard to see {}.',
    'a low resolution photo of the {}.',
    'a rendering of a {}.',
    'graffiti of a {}.',
    'a bad photo of the {}.',
    'a cropped photo of the {}.',
    'a tattoo of a {}.',
    'the embroidered {}.',
    'a photo of a hard to see {}.',
    'a bright photo of a {}.',
    'a photo of a clean {}.',
    'a photo of a dirty {}.',
    'a dark photo of the {}.',
    'a drawing of a {}.',
    'a photo of my {}.',
    'the plastic {}.',
    'a photo of the cool {}.',
    'a close-up photo of a {}.',
    'a black and white photo of the {}.',
    'a painting of the {}.',
    'a painting of a {}.',
    'a pixelated photo of the {}.',
    'a sculpture of the {}.',
    'a bright photo of the {}.',
    'a cropped photo of a {}.',
    'a plastic {}.',
    'a photo of the dirty {}.',
    'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.',
    'a photo of the {}.',
    'a good photo of the {}.',
    'a rendering of the {}.',
    'a {} in a video game.',
    'a photo of one {}.',
    'a doodle of a {}.',
    'a close-up photo of the {}.',
    'a photo of a {}.',
    'the origami {}.',
    'the {} in a video game.',
    'a sketch of a {}.',
    'a doodle of the {}.',
    'a origami {}.',
    'a low resolution photo of a {}.',
    'the toy {}.',
    'a rendition of the {}.',
    'a photo of the clean {}.',
    'a photo of a large {}.',
    'a rendition of a {}.',
    'a photo of a nice {}.',
    'a photo of a weird {}.',
    'a blurry photo of a {}.',
    'a cartoon {}.',
    'art of a {}.',
    'a sketch of the {}.',
    'a embroidered {}.',
    'a pixelated photo of a {}.',
    'itap of the {}.',
    'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.',
    'a plushie {}.',
    'a photo of the nice {}.',
    'a photo of the small {}.',
    'a photo of the weird {}.',
    'the cartoon {}.',
    'art of the {}.',
    'a drawing of the {}.',
    'a photo of the large {}.',
    'a black and white photo of a {}.',
    'the plushie {}.',
    'a dark photo of a {}.',
    'itap of a {}.',
    'graffiti of the {}.',
    'a toy {}.',
    'itap of my {}.',
    'a photo of a cool {}.',
    'a photo of a small {}.',
    'a tattoo of the {}.',
]

CIFAR100 = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.",
    "a photo of the {}.", "a blurry photo of the {}.", "a black and white photo of the {}.",
    "a low contrast photo of the {}.", "a high contrast photo of the {}.", "a bad photo of the {}.",
    "a good photo of the {}.", "a photo of the small {}.", "a photo of the big {}.",
]

# CLIP's UCF101 ensemble: {photo, video, example, demonstration} of {a, the} person {-, using, ...}.
UCF101 = [f"a {kind} of {article} person {verb}{{}}."
          for verb in ("", "using ", "doing ", "during ", "performing ", "practicing ")
          for article in ("a", "the")
          for kind in ("photo", "video", "example", "demonstration")]

TEMPLATE_SETS: dict[str, list[str]] = {
    "clip_default": ["a good photo of a {}."],  # method.md default [choice]
    "photo": ["a photo of a {}."],
    "openai_imagenet": OPENAI_IMAGENET,
    "cifar100": CIFAR100,
    "imagenet-r": OPENAI_IMAGENET,  # CLIP evaluates ImageNet variants with the ImageNet ensemble
    "imagenet-subset": OPENAI_IMAGENET,
    "cub200": ["a photo of a {}, a type of bird."],
    "ucf101": ["a photo of a person doing {}."],  # CoOp
    "ucf101_ensemble": UCF101,
}


def _check_template(template: str) -> str:
    if not isinstance(template, str) or template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must be a string with exactly one '{{}}' "
                         f"(where the class name goes), or a set name: {sorted(TEMPLATE_SETS)}")
    return template


def resolve_templates(spec: Union[str, Sequence[str]]) -> list[str]:
    """Expand set names in `spec` (a name, a template, or a list of either); de-duplicated, in order."""
    items = [spec] if isinstance(spec, str) else list(spec)
    if not items:
        raise ValueError("no prompt templates given; use e.g. ['a good photo of a {}.'] or 'clip_default'")
    out: list[str] = []
    for item in items:
        expanded = TEMPLATE_SETS.get(item) if isinstance(item, str) and "{}" not in item else [item]
        if expanded is None:
            raise ValueError(f"unknown prompt template set {item!r}; known: {sorted(TEMPLATE_SETS)}, "
                             f"or write a template with '{{}}'")
        out += [_check_template(t) for t in expanded if t not in out]
    return out


def format_prompts(class_names: Sequence[str], templates: Union[str, Sequence[str]]) -> list[list[str]]:
    """Per class, its prompts: out[c][k] = templates[k] with class_names[c] filled in."""
    resolved = resolve_templates(templates)
    return [[t.replace("{}", name) for t in resolved] for name in class_names]
