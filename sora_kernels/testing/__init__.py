"""Checks of GPU code that run on a machine without a GPU."""
