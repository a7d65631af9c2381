"""Drafters by name: entry points of the group ``pytest_specdec.drafters``, and the
``pytest_specdec_register_drafters`` hook (plugin/hookspec.py) for drafters in a conftest.py.

The built-in drafters are registered through that group exactly as a third-party
package registers its own. A registered object is a *factory*: called with the
drafter's options as keyword arguments, it returns a fresh :class:`Drafter`. Its
signature is the drafter's option schema: every parameter needs a default, and its
annotation (int, float, bool or str) says how a command-line value is converted.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Mapping

from pytest_specdec.protocol.drafter import Drafter, missing_methods
from pytest_specdec.protocol.hybrid import registered_hybrid
from pytest_specdec.protocol.registered import RegisteredDrafter
from pytest_specdec.protocol.spec import DrafterSpec, parse_drafter_spec

ENTRY_POINT_GROUP = "pytest_specdec.drafters"
#: Hybrids in the default run: the reference table's SAM[EAGLE-3]
DEFAULT_HYBRIDS = ("sam+eagle3",)

@dataclass
class Registry:
    drafters: dict[str, RegisteredDrafter] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # warnings about broken entries

    def add(self, name: str, factory: Callable[..., Drafter], origin: str) -> None:
        if not callable(factory):
            self.problems.append(f"drafter {name!r} from {origin} is not callable "
                                 f"(got {type(factory).__name__}); skipped")
            return
        if "+" in name:  # A+B names a hybrid (protocol/hybrid.py)
            self.problems.append(f"drafter {name!r} from {origin}: '+' is kept for hybrids "
                                 "(A+B); skipped")
            return
        if name in self.drafters:
            self.problems.append(f"drafter {name!r} from {origin} shadows the one from "
                                 f"{self.drafters[name].origin}")
        self.drafters[name] = RegisteredDrafter(name, factory, origin)

    def default_specs(self, *, ablations: bool = False) -> tuple[DrafterSpec, ...]:
        """What runs when no --specdec-drafter is given: every drafter with its
        defaults, then the reference's hybrids (:data:`DEFAULT_HYBRIDS`) whose parts
        are registered; with ``ablations`` (``--specdec-ablations``) each drafter is
        followed by the variants it declares in ``ablations``."""
        specs = []
        for name in sorted(self.drafters):
            specs.append(DrafterSpec(name))
            for variant in getattr(self.drafters[name].factory, "ablations", ()) if ablations else ():
                specs.append(DrafterSpec(name, tuple(sorted(variant.items()))))
        specs += [DrafterSpec(hybrid) for hybrid in DEFAULT_HYBRIDS
                  if all(part in self.drafters for part in hybrid.split("+"))]
        return tuple(specs)

    def get(self, name: str) -> RegisteredDrafter:
        """The drafter `name`; for "A+B", the hybrid of two registered drafters
        (pytest_specdec.protocol.hybrid), built on each call. KeyError lists the registered names."""
        if "+" in name and name not in self.drafters:
            return registered_hybrid(name, self.get)
        try:
            return self.drafters[name]
        except KeyError:
            raise KeyError(f"unknown drafter {name!r}; registered: "
                           f"{', '.join(sorted(self.drafters)) or 'none'}"
                           "; any two combine as A+B") from None


def load_registry() -> Registry:
    """Every drafter registered through entry points; a broken one is skipped and
    described in ``registry.problems``, for the caller to warn about."""
    registry = Registry()
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        origin = f"{dist.name if dist else '?'} ({ep.value})"
        try:
            factory = ep.load()
        except Exception as exc:  # a broken plugin must not take the session down
            registry.problems.append(f"drafter {ep.name!r} from {origin} failed to load: "
                                     f"{type(exc).__name__}: {exc}")
            continue
        registry.add(ep.name, factory, origin)
    return registry


def add_hook_drafters(config: Any, registry: Registry) -> None:
    """Drafters from pytest_specdec_register_drafters (plugin/hookspec.py). Each implementation
    is called on its own, so a broken one becomes a warning naming it (in
    ``registry.problems``) and the others still count."""
    import argparse
    from pathlib import Path

    hook = config.hook.pytest_specdec_register_drafters
    impls = hook.get_hookimpls()
    for impl in impls:
        plugin = impl.plugin
        path = Path(getattr(plugin, "__file__", None) or "?")
        if path.name == "conftest.py":
            shown = path.relative_to(config.rootpath) if path.is_relative_to(config.rootpath) else path
            origin = f"conftest ({shown})"
        else:
            origin = f"plugin ({getattr(plugin, '__name__', None) or impl.plugin_name})"
        where = f"pytest_specdec_register_drafters in {origin}"
        only_this = config.pluginmanager.subset_hook_caller(
            hook.name, [i.plugin for i in impls if i.plugin is not plugin])
        try:  # each result with its items, read here too: a broken mapping is caught
            results = [(r, list(r.items()) if isinstance(r, Mapping) else None)
                       for r in only_this(config=config)]
        except Exception as exc:  # a broken conftest must not take the session down
            registry.problems.append(f"{where} raised {type(exc).__name__}: {exc}; "
                                     "its drafters are skipped")
            continue
        for returned, items in results:
            if items is None:
                registry.problems.append(f"{where} returned {type(returned).__name__}, expected "
                                         "a mapping of drafter names to factories; ignored")
                continue
            for name, factory in items:
                try:  # the names --specdec-drafter accepts
                    valid = isinstance(name, str) and parse_drafter_spec(name) == DrafterSpec(name)
                except argparse.ArgumentTypeError:
                    valid = False
                missing = missing_methods(factory) if inspect.isclass(factory) else []
                if not valid:
                    registry.problems.append(f"{where}: drafter name {name!r} is not a valid "
                                             "NAME (a letter or _, then letters, digits, _ . "
                                             "or -); skipped")
                elif missing:
                    registry.problems.append(f"{where}: drafter {name!r} is a class without "
                                             f"{', '.join(missing)}; skipped")
                else:
                    registry.add(name, factory, origin)
