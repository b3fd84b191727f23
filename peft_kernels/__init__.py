"""peft_kernels: PEFT 0.21's API over fused kernels."""

from .version import __version__

__all__ = ["__version__"]
