"""The Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1). Importing any of them
imports triton.

One module per op (ops/_dispatch.OPS), each with its ``<op>_out`` entry point (the convention of
ebm_fast/ops/_dispatch.py); ``_noise_spec.py`` holds the noise spec as @triton.jit helpers and
``_launch.py`` how launchers pass scalars and lay tiles.
"""
