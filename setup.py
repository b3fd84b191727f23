"""Builds only the optional CUDA extension peft_kernels._C; everything else is in pyproject.toml."""

from setuptools import setup

setup()
