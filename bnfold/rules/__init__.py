"""Fold rules, written once for every graph kind (torch modules, torch.export, ONNX).

A rule matches a pattern around one BN, checks it (a reason when refused) and
rewrites it, asking the graph only what :class:`~bnfold.rules.view.GraphView`
offers. Every module named ``into_*.py`` in this package holds rules; they are
imported here and :data:`RULES` lists them by ``order``. :func:`fold_graph`
repeats them until nothing changes.
"""

import importlib
import pkgutil

from bnfold.rules.driver import fold_graph
from bnfold.rules.rule import Plan, Rule

__all__ = ["RULES", "Plan", "Rule", "fold_graph"]


def _registered() -> tuple[Rule, ...]:
    """One instance of every rule class defined in the ``into_*`` modules, by ``order``."""
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("into_"):
            importlib.import_module(f"{__name__}.{module.name}")
    classes = [cls for cls in Rule.__subclasses__() if cls.__module__.startswith(f"{__name__}.into_")]
    return tuple(cls() for cls in sorted(classes, key=lambda cls: (cls.order, cls.__name__)))


RULES: tuple[Rule, ...] = _registered()
