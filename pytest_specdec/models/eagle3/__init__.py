"""EAGLE-3, the model parts: the draft head (:mod:`.head`), its checkpoint layouts
(:mod:`.checkpoint`) and its side of the training loop (:mod:`.training`). The names
below are what third-party drafters and the built-in ``eagle3`` use."""

from pytest_specdec.models.eagle3.checkpoint import (LAYOUTS, check_fits, config_from_dict,
                                                     detect_layout, load_checkpoint, read_weights,
                                                     save_checkpoint)
from pytest_specdec.models.eagle3.head import (CheckpointError, Eagle3Config, Eagle3Head, HeadCache,
                                               eagle_layers)
from pytest_specdec.models.eagle3.training import (TTT_STEPS, Eagle3Trainable, active_positions,
                                                   draft_vocabulary, trainable)

__all__ = [
    "LAYOUTS", "TTT_STEPS", "CheckpointError", "Eagle3Config", "Eagle3Head", "Eagle3Trainable",
    "HeadCache", "active_positions", "check_fits", "config_from_dict", "detect_layout",
    "draft_vocabulary", "eagle_layers", "load_checkpoint", "read_weights", "save_checkpoint",
    "trainable",
]
