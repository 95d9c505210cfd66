"""Load a user's plain PyTorch model file and build the model it defines.

The file is imported in isolation (a private module name, removed from ``sys.modules``
afterwards) so two model files with the same name never collide and nothing of the
user's leaks into fastgraph. The entry point is, in order: ``--entry NAME`` (a function or
class, called with no arguments, or a module-level ``nn.Module`` instance, used as it is);
``model`` or ``build_model`` (likewise); else the one model the file defines: a module-level
``nn.Module`` instance with parameters (``net = ResNet18()``, as many scripts build theirs;
not one held inside another) or an ``nn.Module`` subclass defined in the file that
constructs with no arguments and of which no such instance exists. More than one such
candidate is a one-line error naming them all.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import sys
import traceback
import types
from pathlib import Path

from torch import nn

from fastgraph.core.errors import ModelError

ENTRY_FUNCTIONS = ("model", "build_model")
_counter = itertools.count()


def _user_line(exc: BaseException, path: Path) -> str:
    """' (line N)' for the deepest traceback frame inside the user's file, else ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename) == path]
    return f" (line {frames[-1].lineno})" if frames else ""


def _exited(exc: SystemExit, path: Path) -> str:
    """Where and how the user's file exited, and the fix: the end of a ``ModelError``."""
    return (f"{_user_line(exc, path)} with SystemExit({exc.code!r}) (sys.exit(), or argparse refusing "
            "the arguments): run such code only under `if __name__ == \"__main__\":`")


def import_model_file(path: str | Path) -> types.ModuleType:
    """Execute a model file as a private module and return it.

    While it runs, ``sys.argv`` is ``[path]``, as for ``python path`` with no arguments:
    fastgraph's own arguments are not the file's, and an argparse parser in it names the
    file, not fastgraph, in what it prints.

    Raises ``ModelError`` (one line) when the file is missing, is not a ``.py`` file, has
    a syntax error (with its line number), raises while it is imported (with the line
    that raised) or exits while it is imported (``sys.exit()``, or argparse refusing the
    arguments; with the line).
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.suffix != ".py":
        raise ModelError(f"model file {path} is not a Python file: give the .py file that defines the model")
    name = f"fastgraph_user_model_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Sibling imports (a helper file next to the model) resolve as they would for the user.
    sys.path.insert(0, str(path.parent))
    sys.modules[name] = module  # dataclasses and pickling look the module up while it runs
    argv, sys.argv = sys.argv, [str(path)]
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ModelError(f"syntax error in {path} line {exc.lineno}: {exc.msg}") from None
    except Exception as exc:  # the user's code raised while being imported
        raise ModelError(
            f"importing {path} failed{_user_line(exc, path)}: {type(exc).__name__}: {exc}"
        ) from None
    except SystemExit as exc:
        raise ModelError(f"{path} exited while being imported{_exited(exc, path)}") from None
    finally:
        sys.argv = argv
        sys.path.remove(str(path.parent))
        sys.modules.pop(name, None)
    return module


def _constructs_without_arguments(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return False
    return all(
        p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        for p in params
    )


def _module_instances(module: types.ModuleType) -> dict[str, nn.Module]:
    """The module-level ``nn.Module`` instances that can be the model, by name.

    Left out: private names (``_cache``); an instance without parameters (a shared
    ``relu = nn.ReLU()`` is a helper, not a model to optimise); an instance that is part of
    another one (a ``backbone`` handed to a wrapper); a second name bound to the same object.
    """
    found: dict[str, nn.Module] = {}
    for name, value in vars(module).items():
        if (isinstance(value, nn.Module) and not name.startswith("_")
                and all(value is not v for v in found.values())
                and next(value.parameters(), None) is not None):
            found[name] = value
    inner = {id(m) for v in found.values() for m in itertools.islice(v.modules(), 1, None)}
    return {name: v for name, v in found.items() if id(v) not in inner}


def find_entry(module: types.ModuleType, path: Path, entry: str | None = None):
    """What builds the model: a callable to call with no arguments, or an ``nn.Module``
    instance to use as it is (the rules are in the module docstring). Raises ``ModelError``
    when there is none, when ``entry`` is not in the file, or when several candidates fit."""
    if entry is not None:
        if not hasattr(module, entry):
            defined = sorted(k for k, v in vars(module).items()
                             if (callable(v) and getattr(v, "__module__", None) == module.__name__)
                             or isinstance(v, nn.Module))
            listed = ", ".join(defined) or "nothing callable"
            raise ModelError(f"{path} has no {entry!r}; it defines: {listed}")
        return getattr(module, entry)
    for fn_name in ENTRY_FUNCTIONS:
        if callable(getattr(module, fn_name, None)):  # an nn.Module instance is callable too
            return getattr(module, fn_name)
    instances = _module_instances(module)
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__]
    # A class the file already built an instance of is that instance's recipe, not a
    # second candidate: ``class Net`` with ``net = Net()`` is one model.
    built = {type(v) for v in instances.values()}
    candidates = {**instances, **{c.__name__: c for c in classes
                                  if _constructs_without_arguments(c) and c not in built}}
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates:
        raise ModelError(
            f"no entry point in {path}: define model() or build_model(), one nn.Module subclass "
            "that constructs with no arguments, or one module-level nn.Module instance, "
            "or pass --entry NAME")
    names = ", ".join(candidates)
    raise ModelError(f"ambiguous entry point in {path}: {names} could each be the model "
                     "(module-level instances or classes that construct with no arguments); "
                     "pass --entry NAME")


def takes_num_classes(factory) -> bool:
    """Whether ``factory`` (a function or class) has a ``num_classes`` parameter, as
    torchvision's and timm's model functions do."""
    try:
        return "num_classes" in inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False


def load_model(path: str | Path, entry: str | None = None, num_classes: int | None = None) -> nn.Module:
    """Build the ``nn.Module`` a model file defines (see the module docstring for the entry rules).

    Args:
        path: a ``.py`` file written as plain PyTorch (no fastgraph import needed).
        entry: name of a function or class in the file to call with no arguments, or of
            a module-level ``nn.Module`` instance.
        num_classes: the data's class count, passed as ``num_classes=`` to an entry that
            takes that parameter (:func:`takes_num_classes`); others are called without it.

    Returns:
        The constructed ``nn.Module`` (parameters as the file initialises them), or the
        module-level instance itself.

    Raises:
        ModelError: file missing, syntax error, import error, no or ambiguous entry point,
            the file or the constructor raising or exiting (``SystemExit``; with its line),
            or an entry that returns no ``nn.Module``.
    """
    path = Path(path).expanduser().resolve()
    module = import_model_file(path)
    factory = find_entry(module, path, entry)
    if isinstance(factory, nn.Module):
        return factory  # built when the file was imported; calling it would run its forward
    label = getattr(factory, "__name__", repr(factory))
    try:
        model = factory(num_classes=num_classes) if num_classes and takes_num_classes(factory) else factory()
    except Exception as exc:
        raise ModelError(f"constructing {label} from {path} raised{_user_line(exc, path)}: "
                         f"{type(exc).__name__}: {exc}") from None
    except SystemExit as exc:
        raise ModelError(f"constructing {label} from {path} exited{_exited(exc, path)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"{label} in {path} returned {type(model).__name__}, not an nn.Module")
    return model
