"""Feast feature repository for fraudstream, importable so jobs and services share its code.

`feast -c feature_repo apply` reads `definitions.py`; Python code imports the same objects
from here.
"""
