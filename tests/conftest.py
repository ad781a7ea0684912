import os

import torch

# The Triton kernels run on the CPU through the interpreter when there is no GPU. It must be set
# before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, Phase, settings  # noqa: E402

# Hypothesis profiles, chosen with HYPOTHESIS_PROFILE (docs/testing.md):
#   dev (default): 25 examples per property, derandomised: the same cases on every run.
#   ci: 100 examples per property, derandomised (reproducible failures in CI logs).
#   thorough: 1000 examples per property, random: new cases on every run (before a release).
#   mutants: dev without shrinking (scripts/mutants.py needs a failure, not its minimal form:
#   shrinking under the Triton interpreter takes minutes).
# Properties slow under the Triton interpreter ask for fewer examples through
# helpers.examples(n), which scales n by the profile's size relative to dev.
_COMMON = dict(
    deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile("dev", max_examples=25, derandomize=True, **_COMMON)
settings.register_profile("ci", max_examples=100, derandomize=True, **_COMMON)
settings.register_profile("thorough", max_examples=1000, derandomize=False, **_COMMON)
settings.register_profile(
    "mutants",
    max_examples=25,
    derandomize=True,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    **_COMMON,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
