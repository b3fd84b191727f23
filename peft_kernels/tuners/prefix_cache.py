"""Old name of ``prefix_cache_builder.py``, kept so that imports written against it keep working."""

from .prefix_cache_builder import (  # noqa: F401
    PREFIX_CACHE_ENV,
    PREFIX_CACHE_MODES,
    build_prefix_cache,
    prefix_cache_mode,
    seq2seq_layer_slots,
    unbatched_prefix,
)
