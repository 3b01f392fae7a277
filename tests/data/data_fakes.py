"""Tiny fake copies of each dataset's real on-disk layout, written into tmp_path.

Every image is a solid colour that encodes (class, index): colour(c, i) = (20 c + 10, 10 i + 5, 128),
so a test can check that the image a dataset returns belongs to the label it returns.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
from PIL import Image


def colour(c: int, i: int) -> tuple[int, int, int]:
    return (20 * c + 10, 10 * i + 5, 128)


def write_image(path: Path, rgb, size=(10, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, tuple(rgb)).save(path, quality=95)


def decode_colour(img: Image.Image) -> tuple[int, int]:
    """(class, index) from a solid-colour image (inverse of `colour`, JPEG-tolerant)."""
    r, g, _ = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(0)
    return int(round((r - 10) / 20)), int(round((g - 5) / 10))


# ----------------------------------------------------------------------------- CIFAR-100
CIFAR_NAMES = ["apple", "aquarium_fish", "baby", "bear", "beaver"]


def make_cifar100(root: Path, n_train: int = 3, n_test: int = 2) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(0)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = [c for c in range(len(CIFAR_NAMES)) for _ in range(n)]
        rng.shuffle(labels)
        data = rng.randint(0, 256, size=(len(labels), 3072)).astype(np.uint8)
        entry = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch",
                 "fine_labels": labels, "coarse_labels": [0] * len(labels), "data": data}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": CIFAR_NAMES, "coarse_label_names": ["fruit", "fish"]}, f, protocol=2)
    return root


# ----------------------------------------------------------------------------- ImageNet-R
IMR_WNIDS = {"n01443537": "goldfish", "n01484850": "great_white_shark", "n01494475": "hammerhead",
             "n01498041": "stingray"}  # four of ImageNet-R's 200 wnids (the loader checks them)
IMR_PER_CLASS = 5


def make_imagenet_r(root: Path, readme: bool = True) -> Path:
    folder = root / "imagenet-r"
    for c, wnid in enumerate(sorted(IMR_WNIDS)):
        for i in range(IMR_PER_CLASS):
            write_image(folder / wnid / f"cartoon_{i}.jpg", colour(c, i))
    if readme:
        lines = ["ImageNet-R(endition) contains art, cartoons, ... of 200 ImageNet classes.", "",
                 "The wnid and class name of each folder:", ""]
        lines += [f"{w} {n}" for w, n in sorted(IMR_WNIDS.items())]
        (folder / "README.txt").write_text("\n".join(lines) + "\n")
    return root


# ----------------------------------------------------------------------------- ImageNet-Subset
IN_SYNSETS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
              "n01484850": "great white shark, white shark, man-eater", "n01491361": "tiger shark, Galeocerdo cuvieri",
              "n01494475": "hammerhead, hammerhead shark"}
IN_SUBSET = ["n01484850", "n01440764", "n01494475"]  # unsorted on purpose: the reader must sort it
IN_KAGGLE_IMAGES = Path("ILSVRC") / "Data" / "CLS-LOC"


def in_val_name(c: int, i: int) -> str:
    """File stem of val image i of class c (c = index in sorted(IN_SYNSETS))."""
    return f"ILSVRC2012_val_{c:04d}{i:04d}"


def make_imagenet_subset(root: Path, n_train: int = 3, n_val: int = 2, mapping: bool = True,
                         class_list: bool = True, flat_val: bool = False, kaggle: bool = False,
                         split_lists: bool = False, meta_bin: bool = False) -> Path:
    """ImageNet with the classes of IN_SYNSETS. kaggle: images under ILSVRC/Data/CLS-LOC/ (metadata
    stays in root). split_lists: continuum/PODNet train_100.txt + val_100.txt over IN_SUBSET
    (label = index in sorted(IN_SUBSET)) instead of imagenet100.txt. meta_bin: torchvision's meta.bin."""
    images = root / IN_KAGGLE_IMAGES if kaggle else root
    rows, train_lines, val_lines = [], [], []
    subset_label = {w: k for k, w in enumerate(sorted(IN_SUBSET))}
    for c, wnid in enumerate(sorted(IN_SYNSETS)):
        for i in range(n_train):
            write_image(images / "train" / wnid / f"{wnid}_{i}.JPEG", colour(c, i))
            if wnid in subset_label:
                train_lines.append(f"train/{wnid}/{wnid}_{i}.JPEG {subset_label[wnid]}")
        for i in range(n_val):
            name = in_val_name(c, i)
            if flat_val:
                write_image(images / "val" / f"{name}.JPEG", colour(c, i))
                rows.append(f"{name},{wnid} 1 2 3 4 {wnid} 5 6 7 8")
            else:
                write_image(images / "val" / wnid / f"{name}.JPEG", colour(c, i))
            if wnid in subset_label:
                rel = f"val/{name}.JPEG" if flat_val else f"val/{wnid}/{name}.JPEG"
                val_lines.append(f"{rel} {subset_label[wnid]}")
    if flat_val:
        (root / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    if mapping:
        (root / "LOC_synset_mapping.txt").write_text(
            "".join(f"{w} {n}\n" for w, n in sorted(IN_SYNSETS.items())))
    if meta_bin:
        write_meta_bin(root / "meta.bin", {w: tuple(n.split(", ")) for w, n in IN_SYNSETS.items()})
    if split_lists:
        (root / "train_100.txt").write_text("\n".join(train_lines) + "\n")
        (root / "val_100.txt").write_text("\n".join(val_lines) + "\n")
    elif class_list:
        (root / "imagenet100.txt").write_text("\n".join(IN_SUBSET) + "\n")
    return root


def write_meta_bin(path: Path, wnid_to_classes: dict) -> None:
    """torchvision ImageNet's meta.bin: torch.save((wnid_to_classes, val_wnids))."""
    import torch

    torch.save((wnid_to_classes, sorted(wnid_to_classes)), path)


# ----------------------------------------------------------------------------- CUB-200-2011
CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
CUB_PER_CLASS = 4


def make_cub(root: Path) -> Path:
    folder = root / "CUB_200_2011"
    images, labels, split = [], [], []
    image_id = 0
    for c, cls in enumerate(CUB_CLASSES):
        for i in range(CUB_PER_CLASS):
            image_id += 1
            rel = f"{cls}/{cls.split('.', 1)[1]}_{i:04d}_{image_id}.jpg"
            write_image(folder / "images" / rel, colour(c, i))
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {1 if i % 2 == 0 else 0}")
    (folder / "images.txt").write_text("\n".join(images) + "\n")
    (folder / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CUB_CLASSES)))
    (folder / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (folder / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return root


# ----------------------------------------------------------------------------- UCF101
# classInd names vs the video-name spelling, as in the real release (HandstandPushups / HandStand).
UCF_CLASSES = [("ApplyEyeMakeup", "ApplyEyeMakeup"), ("HandstandPushups", "HandStandPushups"), ("YoYo", "YoYo")]
UCF_TRAIN_GROUPS, UCF_TEST_GROUPS = (8, 9), (1,)
UCF_FRAMES = 11  # frames per video in the folder layout; the middle one is index 5


def ucf_videos(groups) -> list[tuple[int, str, str]]:
    """(class, class folder, video stem) of every fake video of the given groups."""
    out = []
    for c, (folder, spelled) in enumerate(UCF_CLASSES):
        for g in groups:
            out.append((c, folder, f"v_{spelled}_g{g:02d}_c01"))
    return out


def make_ucf101(root: Path, layout: str = "midframes") -> Path:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("".join(f"{c + 1} {f}\n" for c, (f, _) in enumerate(UCF_CLASSES)))
    (lists / "trainlist01.txt").write_text(
        "".join(f"{f}/{v}.avi {c + 1}\n" for c, f, v in ucf_videos(UCF_TRAIN_GROUPS)))
    (lists / "testlist01.txt").write_text("".join(f"{f}/{v}.avi\n" for c, f, v in ucf_videos(UCF_TEST_GROUPS)))
    for c, folder, video in ucf_videos(UCF_TRAIN_GROUPS + UCF_TEST_GROUPS):
        g = int(video.split("_g")[1][:2])
        if layout == "midframes":
            coop_folder = "_".join(re.findall(r"[A-Z][^A-Z]*", folder))  # CoOp renames: Apply_Eye_Makeup
            write_image(root / "UCF-101-midframes" / coop_folder / f"{video}.jpg", colour(c, g))
        else:  # frame folders; frame_1..frame_11 (natural order); only the middle has colour(c, g)
            for k in range(1, UCF_FRAMES + 1):
                rgb = colour(c, g) if k == UCF_FRAMES // 2 + 1 else (250, 250, 250)
                write_image(root / "UCF-101-frames" / folder / video / f"frame_{k}.jpg", rgb)
    return root
