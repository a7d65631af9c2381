"""The ``pytest-specdec`` command: reports from saved runs, the drafters installed, and
datastores for retrieval drafters (REST).

    pytest-specdec report .benchmarks/*/0001_*.json --out reports
    pytest-specdec compare BASE.json NEW.json --fail speedup:10%,mat:5%
    pytest-specdec list
    pytest-specdec datastore build corpus.jsonl --target embedded --output corpus.rest
    pytest-specdec datastore build owner/chats --split train --column text --output chats.rest
    pytest-specdec train eagle3 --if-missing
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Sequence

from pytest_specdec.bench.record import GATED_METRICS
from pytest_specdec.plugin.values import compare_fail, count, positive_float, temperature
from pytest_specdec.reporting.files import write_reports
from pytest_specdec.reporting.layout import report_meta
from pytest_specdec.reporting.load import ReportError, load_records, select_records
from pytest_specdec.reporting.markdown import render_terminal

PROG = "pytest-specdec"
COMPARE_FORMATS = ("table", "md", "json")
DEFAULT_OUT = "reports"
DEFAULT_STEM = "report"
DEFAULT_PROGRESS_EVERY = 10_000


def load_registry():
    """The installed drafters (imported here: the registry pulls in torch, ``report`` need not)."""
    from pytest_specdec.protocol.registry import load_registry as load_installed

    return load_installed()


def load_tokenizer(spec: str):
    """The target's tokenizer, its name and vocab size (the weights are not loaded)."""
    from pathlib import Path

    from pytest_specdec.engine.target import EMBEDDED, EMBEDDED_NAME, load_tokenizer as load

    tokenizer = load(spec)
    name = EMBEDDED_NAME if spec == EMBEDDED else (
        Path(spec).expanduser().name if Path(spec).expanduser().exists() else spec)
    return tokenizer, name, len(tokenizer)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Speculative decoding benchmarks: "
                                     "reports from saved pytest-benchmark runs.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    report = commands.add_parser(
        "report", help="summary table and md/csv/json/html reports from pytest-benchmark JSON files",
        description="Read runs saved by pytest-benchmark (--benchmark-save/--benchmark-json), "
                    "print the summary table and write NAME.md, NAME.csv, NAME.json and "
                    "NAME.html (with --charts, also NAME-speedup.png, NAME-acceptance.png "
                    "and, for runs of several batch sizes, NAME-batch.png). "
                    "Existing files are never overwritten: NAME-2, NAME-3, ... are used instead.")
    report.add_argument("runs", nargs="+", metavar="RUN.json", help="pytest-benchmark JSON file(s)")
    report.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for the report files (default: {DEFAULT_OUT})")
    report.add_argument("--stem", metavar="NAME",
                        help="report file name without extension (default: the run file's "
                             f"name for one run, {DEFAULT_STEM!r} for several)")
    report.add_argument("--drafter", action="extend", nargs="+", metavar="NAME",
                        help="only these drafters (labels as in the table, e.g. baseline pld)")
    report.add_argument("--paradigm", action="extend", nargs="+", metavar="NAME",
                        help="only these paradigms (e.g. multi_round best_of_n)")
    report.add_argument("--temperature", action="extend", nargs="+", type=temperature,
                        metavar="T", help="only these temperatures (e.g. 0 0.6)")
    report.add_argument("--target", action="extend", nargs="+", metavar="NAME",
                        help="only these target models, named as in the report "
                             "(e.g. SmolLM2-135M-Instruct)")
    report.add_argument("--charts", action="store_true",
                        help="also write PNG charts (speedup bars, per-position acceptance) "
                             "and embed them in the HTML; needs matplotlib: "
                             "pip install pytest-specdec[charts]")
    report.set_defaults(handler=run_report)

    compare = commands.add_parser(
        "compare", help="deltas between two saved runs; gate on metric drops",
        description="Match the cases of two saved runs (pytest-benchmark JSON) and print "
                    "the change of speedup, MAT, acceptance, tokens/s and accuracy. With "
                    "--fail, exit 1 when a metric of a case drops by more than its DROP "
                    "(speedup and tokens/s: or more than their noise floor, whichever is "
                    "larger). Exit 2 on unreadable or foreign files.")
    compare.add_argument("base", metavar="BASE.json", help="the run to compare with")
    compare.add_argument("new", metavar="NEW.json", help="the run being checked")
    compare.add_argument("--fail", type=compare_fail, metavar="METRIC:DROP,...",
                         help="gate rules, e.g. speedup:10%%,mat:5%% (metrics: "
                              + ", ".join(GATED_METRICS) + ")")
    compare.add_argument("--format", choices=COMPARE_FORMATS, default="table",
                         help="table (default), md (Markdown) or json")
    compare.set_defaults(handler=run_compare)

    listing = commands.add_parser("list", help="registered drafters with their options",
                                  description="Every drafter registered under the entry-point "
                                              "group pytest_specdec.drafters, with its options.")
    listing.set_defaults(handler=run_list)

    datastore = commands.add_parser("datastore", help="datastores for retrieval drafters (REST)",
                                    description="Datastores: token ids of a corpus with their "
                                                "suffix array, searched by the rest drafter.")
    actions = datastore.add_subparsers(dest="action", metavar="ACTION")
    datastore.set_defaults(handler=lambda args: _usage(datastore))
    build = actions.add_parser(
        "build", help="tokenize corpus files into a datastore file",
        description="Tokenize the documents of each CORPUS with the target's tokenizer (no "
                    "special tokens added) and write their suffix array as safetensors. A .txt "
                    "corpus holds one document per paragraph (paragraphs are separated by "
                    "blank lines); a .jsonl corpus one JSON object per line; a dataset (a "
                    "Hugging Face id owner/name[:config], or a local folder datasets can "
                    "load) one document per row of --split, from --column (needs the "
                    "'datasets' package). The file is written atomically and never "
                    "overwritten without --force.")
    build.add_argument("corpora", nargs="+", metavar="CORPUS",
                       help=".txt or .jsonl file, dataset folder, or Hugging Face dataset id "
                            "owner/name[:config]")
    build.add_argument("--target", default="embedded", metavar="SPEC",
                       help="model whose tokenizer to use, as --specdec-target takes it "
                            "(default: embedded)")
    build.add_argument("--output", required=True, metavar="FILE", help="datastore file to write")
    build.add_argument("--column", "--text-field", dest="text_field", default="text",
                       metavar="NAME", help="the dataset column, or .jsonl field, holding the "
                                            "text (default: text)")
    build.add_argument("--split", default="train", metavar="SPLIT",
                       help="the split of dataset corpora (default: train)")
    build.add_argument("--force", action="store_true", help="replace FILE if it exists")
    build.add_argument("--progress-every", type=int, default=DEFAULT_PROGRESS_EVERY, metavar="N",
                       help="report progress to stderr every N documents "
                            f"(default: {DEFAULT_PROGRESS_EVERY})")
    build.set_defaults(handler=run_datastore_build)
    _add_train(commands)
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.handler(args)


# --------------------------------------------------------------------------- report


def run_report(args: argparse.Namespace) -> int:
    try:
        if args.charts:
            from pytest_specdec.reporting.charts import require_matplotlib

            require_matplotlib()  # before anything is read, printed or written
        records = _selected_records(args)
        print(render_terminal(records))
        paths = write_reports(records, Path(args.out), args.stem or _default_stem(args.runs),
                              meta=report_meta(records), charts=args.charts)
    except (ReportError, OSError) as exc:  # OSError: the report directory is not writable
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


def _selected_records(args: argparse.Namespace) -> list[dict]:
    records = load_records(args.runs)
    if not records:
        raise ReportError(f"no pytest-specdec records in {', '.join(args.runs)} (benchmarks "
                          "without extra_info['specdec_schema'] are not pytest-specdec cases)")
    selected = select_records(records, drafters=args.drafter, paradigms=args.paradigm,
                              temperatures=args.temperature, targets=args.target)
    if not selected:
        def held(key: str) -> str:
            return ", ".join(dict.fromkeys(str(r[key]) for r in records))

        temperatures = ", ".join(dict.fromkeys(f"{float(r['temperature']):g}" for r in records))
        raise ReportError(f"no records match the filters; the runs hold drafters {held('drafter')}, "
                          f"paradigms {held('paradigm')}, temperatures {temperatures} "
                          f"and targets {held('target')}")
    return selected


def _default_stem(runs: Sequence[str]) -> str:
    return Path(runs[0]).stem if len(runs) == 1 else DEFAULT_STEM


# --------------------------------------------------------------------------- compare


def run_compare(args: argparse.Namespace) -> int:
    """0: no rule broken; 1: a gate rule failed (cases and rules on stderr); 2: bad input."""
    from pytest_specdec.reporting.compare import compare_records, load_run, render

    try:
        base, new = load_run(args.base), load_run(args.new)
    except ReportError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    comparison = compare_records(base, new, rules=args.fail or (), base_name=args.base,
                                 new_name=args.new)
    print(render(comparison, args.format), end="")
    for warning in comparison.warnings:
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if comparison.passed:
        return 0
    for line in comparison.failure_lines():
        print(f"{PROG}: gate failed: {line}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- list


def run_list(args: argparse.Namespace) -> int:
    registry = load_registry()
    for problem in registry.problems:
        print(f"{PROG}: warning: {problem}", file=sys.stderr)
    if not registry.drafters:
        print("no drafters registered (entry-point group pytest_specdec.drafters)")
        return 0
    for name in sorted(registry.drafters):
        print(describe_drafter(registry.drafters[name]))
    if len(registry.drafters) >= 2:  # a hybrid pairs two different drafters
        from pytest_specdec.protocol.hybrid import LIST_NOTE

        print(f"\nhybrids: {LIST_NOTE}")
    return 0


def describe_drafter(drafter) -> str:
    """``name  (origin)``, its draft depth (the k its cases run with, unless
    ``--specdec-k`` overrides it) and one indented line per option: ``key: type = default``."""
    from pytest_specdec.protocol.drafter import DEFAULT_MAX_DEPTH

    depth = getattr(drafter.factory, "max_depth", DEFAULT_MAX_DEPTH)
    lines = [f"{drafter.name}  ({drafter.origin})", f"    draft depth {depth}"
             + ("" if hasattr(drafter.factory, "max_depth") else " (no max_depth declared: the default)")]
    options = drafter.parameters()
    if not options:
        lines.append("    (no options)")
    for key, parameter in options.items():
        lines.append(f"    {key}{_annotation_text(parameter)} = {_default_text(parameter)}")
    return "\n".join(lines)


def _annotation_text(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return ""
    # with `from __future__ import annotations` the annotation is already its source text
    return f": {annotation if isinstance(annotation, str) else getattr(annotation, '__name__', annotation)}"


def _default_text(parameter: inspect.Parameter) -> str:
    if parameter.default is inspect.Parameter.empty:
        return "(no default)"
    return repr(parameter.default)


# --------------------------------------------------------------------------- datastore


def run_datastore_build(args: argparse.Namespace) -> int:
    from pytest_specdec.protocol.datastore import DatastoreError, build_datastore, read_documents

    output = Path(args.output)
    try:
        # everything that can fail cheaply fails before the tokenizer loads
        if args.progress_every < 1:
            raise DatastoreError(f"--progress-every must be >= 1, got {args.progress_every}")
        if output.exists() and not args.force:
            raise DatastoreError(f"{output} already exists; pass --force to replace it")
        if not output.parent.is_dir():
            raise DatastoreError(f"the folder of --output {output} does not exist")
        corpora = [read_documents(source, args.text_field, split=args.split)
                   for source in args.corpora]
        tokenizer, name, vocab_size = load_tokenizer(args.target)
        docs: list[list[int]] = []
        tokens = 0
        for documents in corpora:
            for text in documents:
                docs.append(tokenizer.encode(text, add_special_tokens=False))
                tokens += len(docs[-1])
                if len(docs) % args.progress_every == 0:
                    print(f"{PROG}: tokenized {len(docs)} documents ({tokens} tokens)",
                          file=sys.stderr)
        if tokens == 0:
            raise DatastoreError(f"no text in {', '.join(args.corpora)}: the corpus is empty")
        print(f"{PROG}: building the suffix array of {len(docs)} documents ({tokens} tokens)",
              file=sys.stderr)
        store = build_datastore(docs, tokenizer=name, vocab_size=vocab_size)
        store.save(output, overwrite=args.force)
    except (ValueError, OSError) as exc:  # DatastoreError and TargetError are ValueErrors
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {output} ({store.documents} documents, {len(store)} tokens, "
          f"tokenizer {name})")
    return 0


# --------------------------------------------------------------------------- train


def _trainable_option(text: str) -> tuple[str, object]:
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a name, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def _add_train(commands) -> None:
    from pytest_specdec.training import loop as t
    from pytest_specdec.training.data import DATA_FILE
    from pytest_specdec.training.prompts import DataSettings

    train = commands.add_parser(
        "train", help="train a model drafter's weights (eagle3, sps) by self-distillation",
        description="Train KIND's weights on the target's own generations (self-distillation; "
                    "the data are cached as JSON beside the weights and shared by the kinds). "
                    "Default prompts: the embedded problems except the first --holdout (those "
                    "a default benchmark run uses). The weights (safetensors + config.json "
                    "naming the target) go to --output, by default the cache folder the "
                    "drafters load for this target; a checkpoint in OUTPUT.checkpoint lets "
                    "--resume continue a run stopped by --max-minutes or interrupted.")
    train.add_argument("kind", choices=sorted(t.KINDS), help="the drafter whose weights to train")
    train.add_argument("--target", default="embedded", metavar="SPEC",
                       help="the target, as --specdec-target takes it (default: embedded)")
    train.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:<i>")
    train.add_argument("--dtype", default="auto",
                       help="the target's dtype: auto (default), float32, float16, bfloat16")
    train.add_argument("--output", metavar="DIR",
                       help="weights folder (default: the drafters' default for the target)")
    train.add_argument("--if-missing", action="store_true",
                       help="do nothing when --output already holds complete weights that fit "
                            "the target; resume incomplete ones (stopped by --max-minutes)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUTPUT.checkpoint when there is one")
    train.add_argument("--steps", type=count(1), default=None, metavar="N",
                       help="optimizer steps (default: " + ", ".join(
                           f"{k} {t.kind_defaults(k)['steps']}" for k in sorted(t.KINDS)) + ")")
    train.add_argument("--max-minutes", type=positive_float(True), default=0.0,
                       metavar="M", help="a wall-time limit of the whole command, data included "
                                         "(default: 0, none): weights saved when it stops are "
                                         "marked incomplete; --resume finishes them")
    train.add_argument("--seed", type=count(0), default=0, metavar="S", help="default: 0")
    train.add_argument("--lr", type=positive_float(False), default=None, metavar="LR",
                       help="AdamW peak learning rate (default: " + ", ".join(
                           f"{k} {t.kind_defaults(k)['lr']:g}" for k in sorted(t.KINDS)) + ")")
    train.add_argument("--batch-size", type=count(1), default=None, metavar="B",
                       help="sequences per step (default: " + ", ".join(
                           f"{k} {t.kind_defaults(k)['batch_size']}" for k in sorted(t.KINDS)) + ")")
    train.add_argument("--threads", type=count(1), default=t.DEFAULT_THREADS, metavar="N",
                       help=f"torch threads while training (default: {t.DEFAULT_THREADS}, "
                            "whatever the machine has: the weights' bits depend on it)")
    train.add_argument("--checkpoint-every", type=count(1), default=t.DEFAULT_CHECKPOINT_EVERY,
                       metavar="N", help=f"steps (default: {t.DEFAULT_CHECKPOINT_EVERY})")
    train.add_argument("--option", dest="options", action="append", type=_trainable_option,
                       default=[], metavar="KEY=VALUE",
                       help="an option of KIND's trainable (repeatable)")
    data = DataSettings()
    train.add_argument("--data", metavar="FILE",
                       help=f"the data cache (default: OUTPUT/../{DATA_FILE})")
    train.add_argument("--prompts", default=data.prompts, metavar="SOURCE",
                       help="embedded (default), a .jsonl/.json file of prompts, or a Hugging "
                            "Face dataset owner/name[:config] of problems")
    train.add_argument("--split", default=data.split, help="a dataset's split (default: train)")
    train.add_argument("--holdout", type=count(0), default=None, metavar="N",
                       help="embedded problems left out from the start (default: the "
                            "benchmark's default --specdec-problems)")
    train.add_argument("--prompt-limit", type=count(0), default=data.limit, metavar="N",
                       help="use at most N prompts (default: 0, all)")
    train.add_argument("--max-new-tokens", type=count(1), default=data.max_new_tokens,
                       metavar="N", help=f"tokens per generation (default: {data.max_new_tokens})")
    train.add_argument("--rounds", type=count(1), default=data.rounds, metavar="N",
                       help=f"greedy multi-round generations per problem (default: {data.rounds})")
    train.add_argument("--samples", type=count(0), default=data.samples, metavar="N",
                       help=f"sampled generations per prompt (default: {data.samples})")
    train.add_argument("--sample-temperature", type=positive_float(False),
                       default=data.temperature, metavar="T",
                       help=f"their temperature (default: {data.temperature:g})")
    train.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress bars")
    train.set_defaults(handler=run_train)


def run_train(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pytest_specdec.engine.target import load_target
    from pytest_specdec.models.weights import (TrainingError, default_weights,
                                               trained_otherwise, weights_fit,
                                               weights_incomplete)
    from pytest_specdec.training import loop as t
    from pytest_specdec.training.prompts import DataSettings

    def log(message: str) -> None:
        print(f"{PROG}: {message}", file=sys.stderr)

    try:
        settings = DataSettings(
            prompts=args.prompts, split=args.split,
            holdout=-1 if args.holdout is None else args.holdout, limit=args.prompt_limit,
            max_new_tokens=args.max_new_tokens, rounds=args.rounds, samples=args.samples,
            temperature=args.sample_temperature, seed=args.seed)
        settings.check()
        if args.prompts != "embedded" and args.holdout is not None:
            raise TrainingError(f"--holdout applies to --prompts embedded, "
                                  f"not {args.prompts!r}")
        target = load_target(args.target, device=args.device, dtype=args.dtype)
        output = Path(args.output) if args.output else default_weights(args.kind, target)
        resume, restart = args.resume, False
        if args.if_missing:
            why = weights_fit(output, target)
            unfinished = "" if why else weights_incomplete(output, args.kind, target)
            if not why and not unfinished:
                print(f"{args.kind} weights for {target.name} are in {output}; "
                      f"nothing to do (--if-missing)")
                wanted = dict(t.kind_defaults(args.kind), seed=args.seed,
                              options=dict(args.options), torch_threads=args.threads,
                              data_settings=asdict(settings))
                wanted.update({k: v for k, v in (("steps", args.steps), ("lr", args.lr),
                                                  ("batch_size", args.batch_size))
                               if v is not None})
                differs = trained_otherwise(output, wanted)
                if differs:  # kept: they may be a user's own run; a fresh clone's differ
                    log(f"note: they were trained with other settings than this command's "
                        f"({differs}), so their MAT may differ from a fresh machine's; "
                        f"this command without --if-missing retrains them, replacing them")
                return 0
            log(f"training {args.kind}: {why or unfinished}")
            steps = args.steps or t.kind_defaults(args.kind)["steps"]
            log(f"{args.kind}: {steps} steps from seed {args.seed} (the same weights at any "
                f"load with this torch build on this CPU), after the distillation data "
                f"unless they are cached; a checkpoint every {args.checkpoint_every} steps, "
                f"from which an interrupted run resumes when run again; the bars show each "
                f"phase's ETA")
            # an unfinished run resumes from its checkpoint; one of other settings restarts
            resume, restart = True, True
        result = t.train(
            args.kind, target, output=output, steps=args.steps, seed=args.seed, lr=args.lr,
            batch_size=args.batch_size, max_minutes=args.max_minutes or None,
            resume=resume, restart_mismatched=restart, progress=args.progress,
            data_settings=settings, data_path=Path(args.data) if args.data else None,
            checkpoint_every=args.checkpoint_every, options=dict(args.options),
            threads=args.threads, log=log)
    except (ValueError, OSError) as exc:  # TrainingError and TargetError are ValueErrors
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    state = "complete" if result.steps_done >= result.steps else "INCOMPLETE"
    print(f"wrote {result.output}: {result.kind}, {result.steps_done}/{result.steps} steps "
          f"({state}) in {result.seconds:.0f} s (stopped by {result.stopped}), loss {loss}; "
          f"data {result.data_seconds:.0f} s, target states {result.states_seconds:.0f} s; "
          f"weights {result.digest or 'n/a'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
