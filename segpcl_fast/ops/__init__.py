"""Dispatch for the fused ops: one function per op; see dispatch.py for the backend switch."""
from .dispatch import backend, get_backend, last_choice, set_backend
from .lora_linear import lora_b_linear, lora_b_linear_reference

__all__ = ["backend", "get_backend", "last_choice", "set_backend",
           "lora_b_linear", "lora_b_linear_reference"]
