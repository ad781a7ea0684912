"""A chain's K steps captured once as a CUDA graph and replayed.

Everything the chain reads changes only through its static input buffers (state, counter, seed,
per-step values), which each replay refills; everything else a capture bakes in is part of its
key, so a call that differs there gets a capture of its own.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ebm_fast.backends import forced_backend
from ebm_fast.samplers.energy import parameters_of
from ebm_fast.samplers.schedules import StepValues


def graph_key(energy, x, tables: tuple[StepValues, ...], n_steps: int, chain_offset: int,
              track: bool) -> tuple:
    """What a capture of this chunk's chain bakes in besides its static inputs.

    Parameters are read from their memory at replay: a model whose tensors were replaced (not
    updated in place) or whose mode changed gets a new capture; so does a call under another
    forced backend (the graph holds the kernels it captured).
    """
    params = tuple(p.data_ptr() for p in parameters_of(energy))
    training = getattr(energy, "training", None)
    values = tuple((t.per_step, tuple(t.values.shape), t.values.dtype) for t in tables)
    return (tuple(x.shape), x.dtype, x.device, n_steps, chain_offset, track, values, params,
            training, forced_backend())


class CudaGraphChain:
    """One K-step chain captured as a CUDA graph: static inputs in, replay, results out.
    tables: StepValues held in tensors (StepValues.tabulated)."""

    def __init__(self, run_chain: Callable, x, counter, seed, tables, pool):
        self.x, self.counter, self.seed = x.clone(), counter.clone(), seed.clone()
        self.tables = tuple(dataclasses.replace(t, values=t.values.clone()) for t in tables)
        # Warm up on a side stream (lazy initialisation, compilation, allocator) on scratch copies.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_chain(self.x.clone(), self.counter.clone(), self.seed, self.tables)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = run_chain(self.x, self.counter, self.seed, self.tables)

    def replay(self, x, counter, seed, tables) -> dict:
        self.x.copy_(x)
        self.counter.copy_(counter)
        self.seed.copy_(seed)
        for static, table in zip(self.tables, tables):
            static.values.copy_(table.values)
        self.graph.replay()
        x.copy_(self.x)
        # Graphs of one sampler share a memory pool: copy the outputs out before the next replay.
        return {key: value.clone() for key, value in self.outputs.items()}
