"""Run profiles (``--specdec-profile``): named sizes of a benchmark run that set the
problems, token budget, drafters, paradigms, temperatures, timed rounds and peers
together. An option given explicitly on the command line overrides its profile's
value; an option a profile leaves unset keeps its own default.

Each profile's measured duration on the 2-core CPU and its estimated duration on one
H100 are in the README ("Profiles"); the estimate printed at the start of a session
(:mod:`pytest_specdec.bench.estimate`) says what this machine will take.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pytest_specdec.protocol.spec import DrafterSpec


@dataclass(frozen=True)
class Profile:
    """What a profile sets; None: the option's own default."""

    name: str
    purpose: str
    problems: int | None = None
    max_new_tokens: int | None = None
    # drafters a profile names run like the default set: one whose weights are
    # missing is skipped with the command that provides them, not failed
    drafters: tuple[DrafterSpec, ...] | None = None
    paradigms: tuple[str, ...] | None = None
    temperatures: tuple[float, ...] | None = None
    timed_rounds: int | None = None
    baseline_rounds: int | None = None
    peers: tuple[str, ...] | None = None

    def settings(self) -> dict[str, object]:
        """The values this profile sets, by field name (for the help text and docs)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "purpose") and getattr(self, f.name) is not None}


#: The fields of :class:`Profile` an option overrides, with that option's dest.
PROFILE_OPTIONS = {
    "problems": "specdec_problems",
    "max_new_tokens": "specdec_max_new_tokens",
    "drafters": "specdec_drafters",
    "paradigms": "specdec_paradigms",
    "temperatures": "specdec_temperatures",
    "timed_rounds": "specdec_timed_rounds",
    "baseline_rounds": "specdec_baseline_rounds",
    "peers": "specdec_peers",
}

PROFILES = {p.name: p for p in (
    Profile("smoke", "a first look and PR CI: every paradigm, the baseline, two n-gram "
                     "drafters and a model drafter on one short problem",
            problems=1, max_new_tokens=64,
            drafters=(DrafterSpec("pld"), DrafterSpec("sam"), DrafterSpec("eagle3")),
            baseline_rounds=1, peers=()),
    Profile("default", "the reference table: every built-in drafter at its reference's "
                       "depth, both paradigms at their own temperatures, the peer"),
    # sized for about 30 minutes on one H100 with an 8B target (examples/ci/)
    Profile("gate", "a GPU regression gate: the three n-gram drafters that need no "
                    "weights for a new target, 4 problems of 256 tokens, 3 timed rounds",
            problems=4, max_new_tokens=256,
            drafters=(DrafterSpec("pld"), DrafterSpec("sam"), DrafterSpec("suffix")),
            timed_rounds=3, peers=()),
    # the reference protocol (arXiv 2509.04474): 120 problems, T=0 and T=0.6, long
    # generations (up to 15k tokens); point --specdec-dataset at its data
    Profile("paper", "the reference protocol, for GPUs: 120 problems, both "
                     "temperatures, generations of up to 15,000 tokens",
            problems=120, max_new_tokens=15_000, temperatures=(0.0, 0.6)),
)}

DEFAULT_PROFILE = "default"


def describe(profile: Profile) -> str:
    """One line: the profile's settings as options, e.g. for ``--help`` and the docs."""
    parts = []
    for name, value in profile.settings().items():
        if name == "drafters":
            text = ",".join(spec.label for spec in value)  # type: ignore[attr-defined]
        elif name == "peers":
            text = ",".join(value) or "none"  # type: ignore[arg-type]
        elif isinstance(value, tuple):
            text = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        else:
            text = str(value)
        parts.append(f"{name.replace('_', '-')} {text}")
    return "; ".join(parts) or "every option at its default"
