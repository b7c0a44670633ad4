"""Imports every op module so each registers its kernel specs (build report, benchmarks)."""
from . import fp8_quant  # noqa: F401
