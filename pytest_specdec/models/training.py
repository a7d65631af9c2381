"""The old import path of the training code, kept for third parties: the names it had,
from where they live now (:mod:`pytest_specdec.training` for the data, checkpoints and
the loop; :mod:`pytest_specdec.models.weights` for the weights registry;
:mod:`pytest_specdec.models.trainable` for the trainable protocol and its batch)."""

from pytest_specdec.models.trainable import DistillBatch, Trainable, TrainableFactory
from pytest_specdec.models.weights import (TrainingError, default_weights, finish_command,
                                           target_signature, training_record, training_summary,
                                           weights_fit, weights_incomplete)
from pytest_specdec.training.checkpoints import (CHECKPOINT_FORMAT, checkpoint_folder,
                                                 load_checkpoint, save_checkpoint, save_weights)
from pytest_specdec.training.data import (DATA_FILE, DATA_FORMAT, STATES_FORMAT, DistillData,
                                          generate_data, load_states, prepare_data, save_states,
                                          states_path)
from pytest_specdec.training.generation import (Generated, Row, generate_batched, generate_rows,
                                                sample_seed)
from pytest_specdec.training.loop import (DEFAULT_BATCH_SIZE, DEFAULT_CHECKPOINT_EVERY, DEFAULT_LR,
                                          DEFAULT_MAX_MINUTES, DEFAULT_STEPS, DEFAULT_THREADS,
                                          KIND_DEFAULTS, KINDS, TrainResult, build_info,
                                          kind_defaults, learning_rate, torch_threads, train,
                                          trainable_factory)
from pytest_specdec.training.prompts import (PROMPT_FIELDS, DataSettings, round_prompt,
                                             training_prompts)
from pytest_specdec.training.states import StoredStates, state_layers, target_states

__all__ = [
    "CHECKPOINT_FORMAT", "DATA_FILE", "DATA_FORMAT", "DEFAULT_BATCH_SIZE",
    "DEFAULT_CHECKPOINT_EVERY", "DEFAULT_LR", "DEFAULT_MAX_MINUTES", "DEFAULT_STEPS",
    "DEFAULT_THREADS", "KINDS", "KIND_DEFAULTS", "PROMPT_FIELDS", "STATES_FORMAT", "DataSettings",
    "DistillBatch", "DistillData", "Generated", "Row", "StoredStates", "Trainable",
    "TrainableFactory", "TrainResult", "TrainingError", "build_info", "checkpoint_folder",
    "default_weights", "finish_command", "generate_batched", "generate_data", "generate_rows",
    "kind_defaults", "learning_rate", "load_checkpoint", "load_states", "prepare_data",
    "round_prompt", "sample_seed", "save_checkpoint", "save_states", "save_weights",
    "state_layers", "states_path", "target_signature", "target_states", "torch_threads",
    "train", "trainable_factory", "training_prompts", "training_record", "training_summary",
    "weights_fit", "weights_incomplete",
]
