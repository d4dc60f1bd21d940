"""Benchmarks behind ``deltamem bench`` (each module runs its measurements in one process and prints ratios)."""

__all__: list[str] = []
