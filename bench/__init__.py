"""Benchmarks of fraudstream against the stock Feast paths (`python -m bench`, docs/benchmarks.md).

Each benchmark measures our implementation and the stock alternative in the same run and
reports both with their ratio; none of them asserts anything about timing.
"""
