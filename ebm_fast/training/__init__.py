"""EBM training: losses (one per gradient estimator), the Trainer, checkpoints, diagnostics.

See docs/training.md.
"""

from ebm_fast.training.diagnostics import DivergenceMonitor, TrainingWarning
from ebm_fast.training.jem import JEM, JEMStats, LogitsEnergy, expected_calibration_error
from ebm_fast.training.losses import (
    ContrastiveDivergence,
    EBMLoss,
    KLPersistentML,
    LossStats,
    PersistentCD,
    PersistentML,
    ShortRunML,
)
from ebm_fast.training.trainer import Trainer

__all__ = [
    "ContrastiveDivergence",
    "PersistentCD",
    "PersistentML",
    "ShortRunML",
    "KLPersistentML",
    "EBMLoss",
    "LossStats",
    "Trainer",
    "DivergenceMonitor",
    "TrainingWarning",
    "JEM",
    "JEMStats",
    "LogitsEnergy",
    "expected_calibration_error",
]
