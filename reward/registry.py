"""Where verifiers come from: a decorator, a `file.py:function` string, or a pip package's entry point.

A home-rl verifier scores one response:

    def my_verifier(response: str, ground_truth, *, data_source: str, extra_info: dict) -> float | dict

A dict result carries `score` plus extra keys that are logged. A batch form is allowed too: mark it
`batched=True` (decorator argument, or a `batched = True` attribute on the function) and it is called
once per chunk as `fn(responses, ground_truths, *, data_sources, extra_infos) -> list[float | dict]`.
Functions written for verl, TRL, OpenRLHF or EasyR1 are called their own way (reward/styles.py).
A verifier with one-time costs may carry a `warm_up()` attribute: the reward pool's sandbox
processes call it once at start-up, before any call is timed.

`get_verifier(spec)` resolves, in this order: a name registered with `@register_verifier` (the
built-ins are registered so), a `"path/to/file.py:function"` or `"package.module:function"` string,
and a name published in the `home_rl.verifiers` entry-point group, e.g. in a package's pyproject:

    [project.entry-points."home_rl.verifiers"]
    my_check = "my_package.checks:my_check"
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Union

from home_rl.errors import ConfigError

Verifier = Callable[..., Union[float, dict, list]]
ENTRY_POINT_GROUP = "home_rl.verifiers"

_REGISTRY: dict[str, Verifier] = {}  # @register_verifier names (built-ins included)
_LOADED: dict[str, Verifier] = {}  # file, module and entry-point specs resolved so far


def register_verifier(name: str, *, batched: bool = False) -> Callable[[Verifier], Verifier]:
    """Decorator: make `fn` available as `name` in reward configs (`batched`: fn takes lists)."""
    def decorate(fn: Verifier) -> Verifier:
        if not callable(fn):
            raise TypeError(f"@register_verifier({name!r}) needs a function, got {type(fn).__name__}")
        if batched:
            fn.batched = True
        _REGISTRY[name] = fn
        return fn
    return decorate


def get_verifier(spec: str) -> Verifier:
    """The verifier callable for a registered name, `file.py:function`, `module:function` or entry-point name."""
    _load_builtins()
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if spec in _LOADED:
        return _LOADED[spec]
    if is_import_spec(spec):
        fn = _load_import_spec(spec)
    else:
        fn = _load_entry_point(spec)
    _LOADED[spec] = fn
    return fn


def known_verifiers() -> list[str]:
    """Registered names and entry-point names, sorted (for error messages and --help)."""
    _load_builtins()
    return sorted(set(_REGISTRY) | {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)})


def is_batched(fn: Verifier) -> bool:
    return getattr(fn, "batched", False) is True


def is_import_spec(spec: str) -> bool:
    """True for "path/to/file.py:function" and "package.module:function" (a name has no colon)."""
    return ":" in spec


def is_user_registered(spec: str) -> bool:
    """True when `spec` names a function registered by code outside home-rl's `reward` package.

    Other processes cannot look such a name up (the registering code never ran there), so the
    reward pool ships the function itself; everything else is resolved again from its spec.
    """
    _load_builtins()
    fn = _REGISTRY.get(spec)
    return fn is not None and not (getattr(fn, "__module__", "") or "").startswith("reward.")


def label_of(spec: str) -> str:
    """Short name for logs and result keys: the function name of an import spec, else the spec."""
    return spec.rsplit(":", 1)[1] if is_import_spec(spec) else spec


def absolute_spec(spec: str) -> str:
    """`spec` with a relative file path made absolute (workers may run in another folder)."""
    if is_import_spec(spec):
        target, func = spec.rsplit(":", 1)
        if _is_file_target(target):
            return f"{Path(target).expanduser().resolve()}:{func}"
    return spec


# ----------------------------------------------------------------------------- loading


def _load_builtins() -> None:
    import reward.verifiers  # noqa: F401  (registers math, vqa, ocr, format, choice)


def _is_file_target(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_import_spec(spec: str) -> Verifier:
    target, func = spec.rsplit(":", 1)
    if _is_file_target(target):
        module = _import_file(Path(target).expanduser(), spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"verifier {spec!r}: cannot import module {target!r}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise ConfigError(f"verifier {spec!r}: {target} has no function {func!r}; it has: {', '.join(names) or 'none'}")
    return fn


def _import_file(path: Path, spec: str) -> Any:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"verifier {spec!r}: file not found: {path}")
    # One module per file, under a name that cannot clash with real packages.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = f"_home_rl_verifier_{path.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ConfigError(f"verifier {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    try:  # other processes cannot import this module by its made-up name: pickle its functions by value
        import cloudpickle
        cloudpickle.register_pickle_by_value(module)
    except ImportError:
        pass
    return module


def _load_entry_point(name: str) -> Verifier:
    matches = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
    if not matches:
        raise ConfigError(f"unknown verifier {name!r}; known: {', '.join(known_verifiers())} "
                          f"(or give 'path/to/file.py:function')")
    try:
        fn = matches[0].load()
    except Exception as e:
        raise ConfigError(f"verifier {name!r}: loading entry point {matches[0].value!r} failed: "
                          f"{type(e).__name__}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"verifier {name!r}: entry point {matches[0].value!r} is not a function")
    return fn
