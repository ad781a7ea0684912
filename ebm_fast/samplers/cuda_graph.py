"""A chain's K steps captured once as a CUDA graph and replayed.

Everything the chain reads changes only through its static inputs (ChainInputs: state, counter,
seed, per-step values, conditioning), which each replay refills; everything else a capture bakes
in is part of its key, so a call that differs there gets a capture of its own.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ebm_fast.backends import forced_backend
from ebm_fast.samplers.energy import parameters_of
from ebm_fast.samplers.inputs import ChainInputs


def graph_key(energy, inputs: ChainInputs, n_steps: int, chain_offset: int, track: bool) -> tuple:
    """What a capture of this chunk's chain bakes in besides its static inputs' values.

    Parameters are read from their memory at replay: a model whose tensors were replaced (not
    updated in place) or whose mode changed gets a new capture; so does a call under another
    forced backend (the graph holds the kernels it captured).
    """
    params = tuple(p.data_ptr() for p in parameters_of(energy))
    training = getattr(energy, "training", None)
    return (inputs.key(), n_steps, chain_offset, track, params, training, forced_backend())


class CudaGraphChain:
    """One K-step chain captured as a graph: static inputs in, replay, results out."""

    def __init__(self, run_chain: Callable[[ChainInputs], dict], inputs: ChainInputs, pool):
        self.inputs = inputs.static_copy()
        self.outputs = self._capture(run_chain, pool)

    def _capture(self, run_chain: Callable[[ChainInputs], dict], pool) -> dict:
        # Warm up on a side stream (lazy initialisation, compilation, allocator) on scratch
        # copies of the state and counter.
        scratch = self.inputs.static_copy()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_chain(scratch)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            return run_chain(self.inputs)

    def _replay(self) -> None:
        self.graph.replay()

    def replay(self, inputs: ChainInputs) -> dict:
        self.inputs.copy_(inputs)
        self._replay()
        inputs.x.copy_(self.inputs.x)
        # Graphs of one sampler share a memory pool: copy the outputs out before the next replay.
        return {key: value.clone() for key, value in self.outputs.items()}
