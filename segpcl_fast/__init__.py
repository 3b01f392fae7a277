"""segpcl_fast: SeGP-CL continual learning for CLIP, with fused Triton and C++/CUDA ops.

    import segpcl_fast
    result = segpcl_fast.train()                      # offline world, full SeGP-CL
    result = segpcl_fast.train("cifar100", data__root="/data/cifar")
    print(result.metrics)                             # Avg, Last, Forgetting, BWT, FWT
    clf = segpcl_fast.load_classifier("runs/default")  # the trained run as a classifier
    clf.predict(["photo.jpg"], topk=5)
"""
from ._lazy import lazy_getattr
from .api import ablate, evaluate, make_config, train
from .config import Config, load_config, save_config
from .version import __version__

# imported on first use (PEP 562): torch and torchvision take seconds, and `segpcl-fast --help` or a
# config error needs neither
_LAZY = {"ContinualClassifier": ".classifier", "ClassifierError": ".classifier", "load_classifier": ".classifier",
         "load_model": ".model.clip"}
__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:  # the lazy names too (tab completion, dir())
    return sorted(set(globals()) | set(_LAZY))

__all__ = ["__version__", "Config", "load_config", "save_config", "make_config", "train", "evaluate",
           "ablate", "load_model", "load_classifier", "ContinualClassifier", "ClassifierError"]
