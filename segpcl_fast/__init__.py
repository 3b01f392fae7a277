"""segpcl_fast: SeGP-CL continual learning for CLIP, with fused Triton and C++/CUDA ops."""
from .version import __version__
from .config import Config, load_config, save_config

__all__ = ["__version__", "Config", "load_config", "save_config"]
