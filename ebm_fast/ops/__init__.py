"""Registered ops (torch.library, namespace ``ebm_fast``) and backend selection."""

from ebm_fast.backends import available_backends, use_backend
from ebm_fast.ops.langevin_update import langevin_update
from ebm_fast.ops.mala_accept import mala_accept
from ebm_fast.ops.philox import philox

__all__ = ["available_backends", "use_backend", "langevin_update", "mala_accept", "philox"]
