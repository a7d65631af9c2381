"""The training loop of model drafters, by self-distillation from the target.

A drafter kind supplies a :class:`~pytest_specdec.models.trainable.Trainable` (its
module, its loss on a batch, how it saves itself; :data:`KINDS`: EAGLE-3's and the SpS
draft's); :func:`train` runs the loop on the distillation data (:mod:`.data`): seeded,
AdamW with gradient clipping, a progress bar, a wall-time budget, resumable checkpoints
and final weights swapped in whole (:mod:`.checkpoints`).
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from pytest_specdec.bench.estimate import duration
from pytest_specdec.engine.target import Target
from pytest_specdec.models import draft_lm
from pytest_specdec.models.eagle3 import training as eagle3_training
from pytest_specdec.models.trainable import TrainableFactory
from pytest_specdec.models.weights import TrainingError, finish_command, target_signature
from pytest_specdec.training.checkpoints import (_trained_parameters, checkpoint_folder,
                                                 load_checkpoint, save_checkpoint, save_weights)
from pytest_specdec.training.data import DATA_FILE, DistillData, prepare_data
from pytest_specdec.training.prompts import DataSettings

#: drafter kinds `pytest-specdec train` knows, and the ``trainable`` that builds each
KINDS: dict[str, TrainableFactory] = {"eagle3": eagle3_training.trainable, "sps": draft_lm.trainable}
#: per-kind defaults of the loop, sized so `make bench`'s `train KIND --if-missing` ends
#: within 10 minutes on a 2-core CPU for the embedded target (data generation included)
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 4
DEFAULT_LR = 1e-3
#: the default kinds' own loop defaults (see README "Training model drafters")
KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "eagle3": {"steps": 240, "lr": 1e-3, "batch_size": 4},
    "sps": {"steps": 200, "lr": 1e-3, "batch_size": 4},
}
#: no wall-clock limit by default: a run does its steps (see train())
DEFAULT_MAX_MINUTES: float | None = None
#: torch threads of a training run, whatever the machine has (see torch_threads())
DEFAULT_THREADS = 2
DEFAULT_CHECKPOINT_EVERY = 50
WARMUP_STEPS = 20
FINAL_LR_RATIO = 0.1
CLIP_NORM = 1.0


def trainable_factory(kind: str | TrainableFactory) -> tuple[str, TrainableFactory]:
    """The kind's name and its ``trainable(target, data, **options)`` factory."""
    if callable(kind):
        return getattr(kind, "kind", getattr(kind, "__name__", "custom")), kind
    if kind not in KINDS:
        raise TrainingError(f"drafter kind {kind!r} is not one of {', '.join(KINDS)}")
    return kind, KINDS[kind]


# ------------------------------------------------------------------------------ the loop


@dataclass
class TrainResult:
    """What a run did: the steps done (of those asked), why it stopped, the last loss
    (mean of the last 10 steps), the wall time of the steps (`seconds`), of preparing
    the data (`data_seconds`: generating them or reading the cache) and of the
    target's states (`states_seconds`: computed before the first step)."""

    kind: str
    output: Path
    steps_done: int
    steps: int
    stopped: str           # "steps" | "time" | "skipped"
    loss: float | None
    first_loss: float | None
    seconds: float
    seconds_per_step: float | None
    data_seconds: float = 0.0
    states_seconds: float = 0.0
    digest: str = ""       # the weights' digest (training.json's weights_digest)


def kind_defaults(kind: str) -> dict[str, Any]:
    """The loop's defaults for `kind` (steps, lr, batch_size; a custom trainable gets
    :data:`DEFAULT_STEPS` etc.)."""
    base = {"steps": DEFAULT_STEPS, "lr": DEFAULT_LR, "batch_size": DEFAULT_BATCH_SIZE}
    return dict(base, **KIND_DEFAULTS.get(kind, {}))


def learning_rate(lr: float, step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based) of `steps`: a linear warm-up over
    the first WARMUP_STEPS, then a cosine decay to FINAL_LR_RATIO of `lr` at the last
    step. A pure function of the step, so a resumed run follows the same schedule."""
    warm = min(1.0, (step + 1) / WARMUP_STEPS)
    if steps <= WARMUP_STEPS:
        return lr * warm
    progress = min(1.0, max(0.0, (step - WARMUP_STEPS) / max(1, steps - 1 - WARMUP_STEPS)))
    decay = FINAL_LR_RATIO + (1 - FINAL_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr * warm * decay


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run with torch's intra-op thread count set to `threads` (None: as it is), then
    restore it. A reduction splits its work by thread count, so the same weights need
    the same count: the training fixes it instead of taking the machine's core count."""
    before = torch.get_num_threads()
    if threads is not None and threads != before:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def build_info() -> dict[str, Any]:
    """What besides the inputs decides the weights' bits: torch's version, the CPU
    instruction set its kernels dispatch to, and the CPU itself (measured: AVX2 kernels
    on two EPYC models gave different digests from the same data)."""
    capability = None
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch
        pass
    return {"torch": torch.__version__, "cpu_capability": capability, "cpu": cpu_model()}


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere the platform's word)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(kind: str | TrainableFactory, target: Target, *, output: Path,
          steps: int | None = None, seed: int = 0, lr: float | None = None,
          batch_size: int | None = None, max_minutes: float | None = None,
          resume: bool = False, progress: bool = True, data: DistillData | None = None,
          data_settings: DataSettings | None = None, data_path: Path | None = None,
          checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
          options: dict[str, Any] | None = None, threads: int | None = DEFAULT_THREADS,
          restart_mismatched: bool = False,
          log: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> TrainResult:
    """Train `kind`'s drafter on the target's own generations and write its weights to
    `output` (atomically; plus training.json recording the run).

    `kind` is "eagle3" or "sps" (their modules' ``trainable``) or any
    ``trainable(target, data, **options)`` factory; `steps`, `lr` and `batch_size`
    default to :func:`kind_defaults`. `data` defaults to :func:`prepare_data` at
    `data_path` (default: ``OUTPUT/../distill-data.json``, which the kinds' default
    folders share).

    The run is a fixed number of steps from `seed`: python and torch RNGs, the batch
    order, AdamW with a warm-up and cosine decay of the learning rate
    (:func:`learning_rate`) and gradient clipping at norm 1, all under `threads` torch
    threads (default 2, whatever the machine has; None: as set), so the same commit,
    torch build, thread count and CPU (:func:`build_info`, recorded in training.json)
    give bit-identical weights at any load and speed. A checkpoint every
    `checkpoint_every` steps goes to ``OUTPUT.checkpoint`` (safetensors + state.json),
    from which `resume` continues with the same batches
    and RNG states: a resumed run ends with the weights of an uninterrupted one. It
    refuses a checkpoint of other settings, unless `restart_mismatched` (then it starts
    over).

    `max_minutes` (None or 0: none, the default) bounds the call's wall time from its
    start, data and states included: when it runs out the run stops after the current
    step (it does at least one), saves the weights **marked incomplete** (training.json
    ``"complete": false``, ``steps_done`` < ``steps``; the drafters refuse them, see
    :func:`weights_incomplete`) and keeps the checkpoint for `resume`. A run that
    finishes its steps removes the checkpoint.
    """
    from tqdm.auto import tqdm

    clock = time.monotonic()  # the budget covers the data and the states too
    output = Path(output)
    name, factory = trainable_factory(kind)
    defaults = kind_defaults(name)
    steps = defaults["steps"] if steps is None else steps
    lr = defaults["lr"] if lr is None else lr
    batch_size = defaults["batch_size"] if batch_size is None else batch_size
    _check_loop_values(steps=steps, seed=seed, lr=lr, batch_size=batch_size,
                       max_minutes=max_minutes, checkpoint_every=checkpoint_every)
    if threads is not None and (type(threads) is not int or threads < 1):
        raise TrainingError(f"threads {threads!r} must be an int >= 1 (or None: as set)")
    with torch_threads(threads) as used_threads:
        return _train(name, factory, target, output=output, steps=steps, seed=seed, lr=lr,
                      batch_size=batch_size, max_minutes=max_minutes, resume=resume,
                      progress=progress, data=data, data_settings=data_settings,
                      data_path=data_path, checkpoint_every=checkpoint_every,
                      options=options, threads=used_threads,
                      restart_mismatched=restart_mismatched, log=log, clock=clock, tqdm=tqdm)


def _train(name: str, factory: TrainableFactory, target: Target, *, output: Path, steps: int,
           seed: int, lr: float, batch_size: int, max_minutes: float | None, resume: bool,
           progress: bool, data: DistillData | None, data_settings: DataSettings | None,
           data_path: Path | None, checkpoint_every: int, options: dict[str, Any] | None,
           threads: int, restart_mismatched: bool, log: Callable[[str], None], clock: float,
           tqdm: Any) -> TrainResult:
    data_started = time.perf_counter()
    made_by = None  # the settings the data were made with (None: data given)
    if data is None:
        made_by = data_settings or DataSettings(seed=seed)
        data = prepare_data(target, Path(data_path) if data_path else output.parent / DATA_FILE,
                            made_by, progress=progress, log=log)
    data_seconds = time.perf_counter() - data_started
    random.seed(seed)
    torch.manual_seed(seed)
    trainable = factory(target, data, **(options or {}))
    name = str(getattr(trainable, "kind", name))
    module = trainable.module
    params = list(_trained_parameters(module).values())
    if not params:
        raise TrainingError(f"{name}'s trainable has no parameters that require grad")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    meta = {"kind": name, "seed": seed, "batch_size": batch_size, "steps": steps, "lr": lr,
            "options": {k: v for k, v in sorted((options or {}).items())},
            "torch_threads": threads, "data": data.fingerprint(),
            "target": target_signature(target)}
    checkpoint = checkpoint_folder(output)
    start = 0
    if resume and (checkpoint / "state.json").is_file():
        record = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
        differs = [k for k, v in meta.items() if _jsonable(record.get(k)) != _jsonable(v)]
        if differs:
            why = (f"checkpoint {checkpoint} was made with other "
                   + ", ".join(f"{k} ({record.get(k)!r}, not {meta[k]!r})" for k in differs))
            if not restart_mismatched:
                raise TrainingError(why + "; run without --resume to start over")
            log(f"{why}: starting {name} over from step 0")
        else:
            start = int(load_checkpoint(checkpoint, module=module, optimizer=optimizer)["step"])
            log(f"resuming {name} from step {start} of {steps} ({checkpoint})")
    elif resume:
        log(f"no checkpoint in {checkpoint}: starting {name} from step 0")
    if start > steps:
        raise TrainingError(f"the checkpoint is at step {start}, past --steps {steps}")
    module.train()
    batches = data.batches(target, trainable.hidden_layers, batch_size=batch_size, seed=seed,
                           start=start)
    deadline = clock + max_minutes * 60 if max_minutes else math.inf
    started = time.perf_counter()
    states_seconds = 0.0  # the first batch computes the whole set's states (if they fit)
    losses: list[float] = []
    first_loss = None
    step = start
    stopped = "steps"
    bar = tqdm(total=steps, initial=start, desc=f"train {name}", disable=not progress,
               unit="step", dynamic_ncols=True)
    try:
        while step < steps:
            if time.monotonic() >= deadline and step > start:  # at least one step
                stopped = "time"
                break
            fetched = time.perf_counter()
            batch = next(batches)
            if step == start:
                states_seconds = time.perf_counter() - fetched
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(lr, step, steps)
            loss = trainable.loss(batch)
            if not torch.isfinite(loss):
                raise TrainingError(f"{name}: the loss is {loss.item()} at step {step}; "
                                    f"try a lower --lr than {lr}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            first_loss = value if first_loss is None else first_loss
            losses.append(value)
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.4f}")
            if step % checkpoint_every == 0 and step < steps:
                save_checkpoint(checkpoint, step=step, module=module, optimizer=optimizer,
                                meta=meta)
                elapsed = time.perf_counter() - started - states_seconds
                left = elapsed / (step - start) * (steps - step)
                message = (f"{name}: step {step}/{steps} after {duration(elapsed)}, about "
                           f"{duration(left)} to go; checkpoint saved (an interrupted run "
                           "resumes from it when run again)")
                if progress:  # above the bar (a log line would break it)
                    bar.write(f"pytest-specdec: {message}", file=sys.stderr)
                else:
                    log(message)
    finally:
        bar.close()
    seconds = time.perf_counter() - started - states_seconds
    done = step - start
    result = TrainResult(kind=name, output=output, steps_done=step, steps=steps, stopped=stopped,
                         loss=sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                         first_loss=first_loss, seconds=round(seconds, 2),
                         seconds_per_step=round(seconds / done, 4) if done else None,
                         data_seconds=round(data_seconds, 2),
                         states_seconds=round(states_seconds, 2))
    record = dict(meta, steps_done=step, complete=step >= steps, stopped=stopped,
                  loss=result.loss, first_loss=first_loss, seconds=result.seconds,
                  seconds_per_step=result.seconds_per_step, data_seconds=result.data_seconds,
                  states_seconds=result.states_seconds, resumed_from=start,
                  sequences=len(data.sequences), generated_tokens=data.generated_tokens,
                  data_settings=None if made_by is None else asdict(made_by),
                  **build_info())
    result.digest = save_weights(trainable, output, record)
    if step < steps:
        save_checkpoint(checkpoint, step=step, module=module, optimizer=optimizer, meta=meta)
        log(f"stopped at step {step} of {steps} (the {max_minutes:g}-minute limit): the "
            f"weights in {output} are marked incomplete; `{finish_command(name, target)}` "
            f"finishes them from {checkpoint}")
    else:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return result


def _jsonable(value: Any) -> Any:
    """`value` as state.json holds it (tuples become lists)."""
    return json.loads(json.dumps(value))


def _check_loop_values(*, steps: Any, seed: Any, lr: Any, batch_size: Any, max_minutes: Any,
                       checkpoint_every: Any) -> None:
    for name, value, low in (("steps", steps, 1), ("seed", seed, 0),
                             ("batch_size", batch_size, 1), ("checkpoint_every", checkpoint_every, 1)):
        if type(value) is not int or value < low:
            raise TrainingError(f"{name} {value!r} must be an int >= {low}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise TrainingError(f"lr {lr!r} must be a number > 0 (e.g. {DEFAULT_LR})")
    if max_minutes is not None and not (isinstance(max_minutes, (int, float))
                                        and math.isfinite(max_minutes) and max_minutes >= 0):
        raise TrainingError(f"max_minutes {max_minutes!r} must be a number >= 0 (0: no limit)")
