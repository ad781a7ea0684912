"""The pure-torch reference kernels: the specification every backend is held to.

One module per op (ops/_dispatch.OPS), each with its ``<op>_out`` entry point (the convention of
ebm_fast/ops/_dispatch.py); ``philox.py`` also holds the noise spec in pure torch.
"""
