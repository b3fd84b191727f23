"""Backends: ``reference`` (pure torch, the spec), ``triton``, ``cuda``.

Every backend package exposes the same three functions, used only by ``ops/_dispatch.py``:

- ``unavailable_reason() -> str | None``: why the whole backend cannot run here (decided once, cached);
- ``get_impl(op_name) -> callable``: the implementation of one op, same signature in every backend;
- ``not_supported_reasons(op_name, *args) -> list[str]``: why this call's arguments cannot run on it.
"""
