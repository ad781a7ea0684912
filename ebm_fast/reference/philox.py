"""Reference ``philox_out``: fills ``out`` from the pure-torch noise spec in ebm_fast/noise.py."""

from ebm_fast.noise import philox_bits_ref, philox_normal_ref, philox_uniform_ref

_DRAWS = {"normal": philox_normal_ref, "uniform": philox_uniform_ref, "bits": philox_bits_ref}


def philox_out(out, seed, step, stream, chain_offset, distribution):
    out.copy_(_DRAWS[distribution](out.shape, seed=seed, step=step, stream=stream,
                                   chain_offset=chain_offset, device=out.device))
