"""The pure-torch reference kernels: the specification every backend is held to.

KERNELS maps each op to its entry point (the convention of ebm_fast/ops/_dispatch.py).
"""

from ebm_fast.reference.buffer_push import buffer_push_out
from ebm_fast.reference.buffer_sample import buffer_sample_out
from ebm_fast.reference.langevin_update import langevin_update_out
from ebm_fast.reference.mala_accept import mala_accept_out
from ebm_fast.reference.philox import philox_out

KERNELS = {
    "buffer_push": buffer_push_out,
    "buffer_sample": buffer_sample_out,
    "langevin_update": langevin_update_out,
    "mala_accept": mala_accept_out,
    "philox": philox_out,
}
