from .config import PrefixTuningConfig

__all__ = ["PrefixTuningConfig"]
