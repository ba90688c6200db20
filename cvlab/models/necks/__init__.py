"""Necks of the model zoo; every module here is imported (and so registered) by cvlab.models."""
