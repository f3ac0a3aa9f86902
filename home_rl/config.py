"""Typed configs: OmegaConf structured dataclasses, loaded from YAML plus `key.sub=value` overrides.

A recipe declares one top-level dataclass. Its fields are the documentation of every knob: each
field carries a one-line comment after it, and `--help` prints those comments. Unknown keys and
wrong types are errors that name the key and suggest the closest valid one. Fields whose values
come from a fixed set declare it in a `CHOICES` class variable.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, ClassVar, Iterator, Optional, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from home_rl.errors import ConfigError

T = TypeVar("T")


# ----------------------------------------------------------------------------- shared sections


@dataclasses.dataclass
class LoraConfig:
    rank: int = 16  # LoRA rank of the think adapter
    alpha: float = 32.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input (0: learners and engines compute the same policy)
    targets: str = "gate_proj,up_proj,down_proj"  # the MLP projections that get an adapter, comma-separated

    def spec(self) -> Any:
        """The adapter's home_rl.model.lora_expert.LoraSpec (a ModelError names a bad value)."""
        from home_rl.model.lora_expert import LoraSpec

        return LoraSpec(rank=self.rank, alpha=float(self.alpha), dropout=self.dropout,
                        targets=tuple(t.strip() for t in self.targets.split(",") if t.strip()))


@dataclasses.dataclass
class ModelConfig:
    path: str = "smollm2"  # dense or HOME checkpoint folder, or an embedded model's name (smollm2)
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16: dtype of the weights in memory and on disk
    think_expert: str = "full"  # a HOME model built here (upcycling, the embedded cold start): full (its own MLPs) | lora (an adapter over fast's MLPs, model.lora); a HOME checkpoint given decides itself
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)  # the think adapter when think_expert=lora

    CHOICES: ClassVar[dict] = {"dtype": ("float32", "bfloat16", "float16"), "think_expert": ("full", "lora")}

    def lora_spec(self) -> Any:
        """The think adapter's LoraSpec when think_expert=lora, else None."""
        return self.lora.spec() if self.think_expert == "lora" else None


@dataclasses.dataclass
class RouterConfig:
    layer: Optional[int] = None  # decoder layer of the fast view whose output feeds the router (None: the middle one)
    pooling: str = "mean"  # how prompt positions are pooled into one vector: mean | last
    hidden_size: int = 256  # width of the router MLP's hidden layer

    CHOICES: ClassVar[dict] = {"pooling": ("mean", "last")}


# ----------------------------------------------------------------------------- loading


def load_config(schema: type[T], argv: Optional[list[str]] = None, prog: Optional[str] = None) -> T:
    """Build `schema` from `--config FILE` and `key=value` overrides in `argv` (sys.argv[1:] by default).

    `--help` prints every field with its default and comment, then exits.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(help_text(schema, prog or Path(sys.argv[0]).name))
        raise SystemExit(0)

    files, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg == "--config":
            files.append(next(it, None) or _fail("--config needs a file path"))
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE.yaml and key.sub=value overrides (--help lists keys)")

    cfg = OmegaConf.structured(schema)
    given: set[str] = set()  # the keys the user set: a derived setting they gave is kept (or refused), not derived
    for f in files:
        path = Path(f)
        if not path.is_file():
            raise ConfigError(f"config file not found: {f}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # YAML syntax errors
            raise ConfigError(f"cannot parse config file {f}: {e}") from None
        cfg = _merge(cfg, loaded, schema, source=str(f))
        given.update(_leaf_keys(OmegaConf.to_container(loaded)))
    if overrides:
        try:
            dotlist = OmegaConf.from_dotlist(overrides)
        except OmegaConfBaseException as e:
            raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None
        cfg = _merge(cfg, dotlist, schema, source="command line")
        given.update(_leaf_keys(OmegaConf.to_container(dotlist)))
    obj = OmegaConf.to_object(cfg)
    check_choices(obj)
    return resolved(obj, frozenset(k for k in given if k))


def resolved(cfg: T, given: frozenset[str] = frozenset()) -> T:
    """`cfg` with its derived settings filled in, for configs that define `resolve(given)` (where they are derived
    is where the config is loaded, so that config.yaml and --help show what runs). `given`: the dotted keys the
    config files and overrides set (empty for a config built in code), e.g. lengths the user set are not lowered
    to fit the model (home_rl/context_length.py)."""
    resolve = getattr(cfg, "resolve", None)
    return resolve(given) if callable(resolve) else cfg


def _fail(msg: str):
    raise ConfigError(msg)


def _merge(cfg, other, schema: type, source: str):
    try:
        return OmegaConf.merge(cfg, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        # OmegaConf names only the first unknown segment ('routr'); report the whole key given ('routr.layer').
        given = [k for k in _leaf_keys(OmegaConf.to_container(other)) if k == key or k.startswith(key + ".")]
        key = given[0] if given else key
        raise ConfigError(f"unknown config key {key!r} (from {source}){did_you_mean(key, schema)}") from None
    except ValidationError as e:
        key = e.full_key or str(e.key)
        expected = _field_type_name(schema, key)
        raise ConfigError(f"bad value for {key!r} (from {source}): {e.msg.splitlines()[0]}"
                          + (f"; expected {expected}" if expected else "")) from None


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict) or not node:
        return [prefix.rstrip(".")]
    return [k for name, child in node.items() for k in _leaf_keys(child, f"{prefix}{name}.")]


def did_you_mean(key: str, schema: type) -> str:
    """', did you mean 'x.y'?' for the valid key closest to `key` (empty when none is close)."""
    keys = [k for k, _, _, _ in iter_fields(schema)]
    best = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not best:  # a typo in the last segment only: compare the leaf names under the same parent
        parent, _, leaf = key.rpartition(".")
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        near = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.5)
        best = [siblings[near[0]]] if near else []
    return f", did you mean {best[0]!r}?" if best else f"; valid keys here: {', '.join(_sibling_keys(key, keys))}"


def _sibling_keys(key: str, keys: list[str]) -> list[str]:
    parent = key.rpartition(".")[0]
    same = [k for k in keys if k.rpartition(".")[0] == parent]
    return same or list(dict.fromkeys(k.split(".")[0] for k in keys))  # else the top-level sections


def check_choices(obj: Any, prefix: str = "") -> None:
    """Raise ConfigError for any field whose value is outside its class's CHOICES."""
    if not dataclasses.is_dataclass(obj):
        return
    choices = getattr(type(obj), "CHOICES", {})
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if f.name in choices and value not in choices[f.name]:
            raise ConfigError(f"bad value for {key!r}: {value!r}; expected one of {', '.join(map(str, choices[f.name]))}")
        check_choices(value, key + ".")


def save_config(cfg: Any, out_dir: str | Path) -> Path:
    """Write the resolved config as `out_dir/config.yaml` (loadable again with --config)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    tmp.replace(path)
    return path


def to_dict(cfg: Any) -> dict:
    """Plain dict of a config dataclass (for logging and for passing to Ray actors)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# ----------------------------------------------------------------------------- introspection


def iter_fields(schema: Any, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """Yield (dotted key, type name, default, comment) for every leaf field of a config dataclass.

    `schema` may be a class or an instance: a section made by a default_factory is walked as that
    instance, so a recipe's own defaults for a shared section (e.g. 2 learners) are what is shown.
    """
    cls = schema if isinstance(schema, type) else type(schema)
    comments = field_comments(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        ftype = hints.get(f.name, f.type)
        if not isinstance(schema, type):
            default = getattr(schema, f.name)
        elif f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "???"
        if dataclasses.is_dataclass(ftype):
            yield from iter_fields(default if dataclasses.is_dataclass(default) else ftype, key + ".")
            continue
        yield key, _type_name(ftype), default, comments.get(f.name, "")


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment written after it (or on the line above it) in the class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments, above = {}, ""
    for line in source.splitlines():
        stripped = line.strip()
        m = re.match(r"^(\w+)\s*:\s*[^#]*?(?:#\s*(.*))?$", stripped)
        if stripped.startswith("#"):
            above = stripped.lstrip("# ").strip()
        elif m and not stripped.startswith(("def ", "class ", "return")):
            comments[m.group(1)] = (m.group(2) or above).strip()
            above = ""
        else:
            above = ""
    return comments


def help_text(schema: type, prog: str) -> str:
    rows = list(iter_fields(resolved(schema())))  # the defaults as they run, derived settings included
    width = max((len(k) for k, *_ in rows), default=10)
    lines = [f"usage: {prog} [--config FILE.yaml] [key.sub=value ...]", "", "Every key, its default and what it does:"]
    for key, tname, default, comment in rows:
        lines.append(f"  {key:<{width}}  {tname:<10} = {default!r:<24} {comment}")
    return "\n".join(lines)


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is typing.Union:
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return f"{_type_name(args[0])}?" if len(args) == 1 else "|".join(map(_type_name, args))
    if origin in (list, typing.List):
        return f"list[{_type_name(typing.get_args(t)[0])}]"
    if origin in (dict, typing.Dict):
        return "dict"
    return getattr(t, "__name__", str(t))


def _field_type_name(schema: type, key: str) -> str:
    for k, tname, _, _ in iter_fields(schema):
        if k == key:
            return tname
    return ""
