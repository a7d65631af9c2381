"""One decode loop for the baseline and every drafter: chain and tree verification, the
guard around every drafter call, exact mode, targets, the integrity fingerprint, torch's
global state, the clock and a decode's statistics. Imports only :mod:`..protocol`; the
names below are its public API."""

from pytest_specdec.engine.guard import LENT, READ_ONLY, TORCH_STATE, TokenView, attach, target_info
from pytest_specdec.engine.loop import SIGNAL_TOP_K, Generation, GenerationRequest, generate
from pytest_specdec.engine.verify import StepResult, speculative_step, verify_chain, verify_tree

__all__ = [
    "LENT", "READ_ONLY", "SIGNAL_TOP_K", "TORCH_STATE", "Generation", "GenerationRequest",
    "StepResult", "TokenView", "attach", "generate", "speculative_step", "target_info",
    "verify_chain", "verify_tree",
]
