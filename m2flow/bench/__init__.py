"""Benchmark commands (`m2flow bench ...`): each compares against a baseline measured in the same run."""
