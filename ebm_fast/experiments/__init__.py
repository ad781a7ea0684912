"""Experiments built on the library (``ebm-fast demo``, ``ebm-fast study``): their models,
training runs and reports. A layer above ebm_fast: nothing in the library imports it."""
