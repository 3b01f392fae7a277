"""segpcl_fast: SeGP-CL continual learning for CLIP, with fused Triton and C++/CUDA ops.

    import segpcl_fast
    result = segpcl_fast.train()                      # offline world, full SeGP-CL
    result = segpcl_fast.train("cifar100", data__root="/data/cifar")
    print(result.metrics)                             # Avg, Last, Forgetting, BWT, FWT
    clf = segpcl_fast.load_classifier("runs/default")  # the trained run as a classifier
    clf.predict(["photo.jpg"], topk=5)
"""
from .api import ablate, evaluate, make_config, train
from .classifier import ContinualClassifier, load_classifier
from .config import Config, load_config, save_config
from .model.clip import load_model
from .version import __version__

__all__ = ["__version__", "Config", "load_config", "save_config", "make_config", "train", "evaluate",
           "ablate", "load_model", "load_classifier", "ContinualClassifier"]
