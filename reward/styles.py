"""Calling conventions: each framework's reward functions are called the way that framework calls them.

    style     signature                                                   called with
    home      fn(response, ground_truth, *, data_source, extra_info)      one sample (batched=True: lists, plural keywords)
    verl      compute_score(data_source, solution_str, ground_truth,      keywords, only those it accepts (as verl's
              extra_info)  / compute_score_batched(data_sources,          NaiveRewardManager / BatchRewardManager do)
              solution_strs, ground_truths, extra_infos)
    trl       reward_func(prompts, completions, completion_ids, **cols)   a chunk, every data column as a keyword list
    openrlhf  reward_func(queries, prompts, labels)                       a chunk, positionally
    easyr1    compute_score(reward_inputs) / compute_score(reward_input)  a chunk of dicts / one dict

Without a `style`, the signature decides: verl's functions name `solution_str(s)`, TRL's `completions`,
OpenRLHF's `queries`, EasyR1's `reward_input(s)`; home's take two positional arguments and accept
`data_source` and `extra_info` as keywords. A signature that fits none, or several, is a ConfigError.

Any style may be an `async def`: the sandbox awaits it, and gathers a chunk's async calls concurrently.

What each style gets from a sample (reward/scoring.py `clean_sample`):
    trl       prompts: the row's prompt (text, or its chat messages); completions: the response text, or
              [{"role": "assistant", "content": text}] when the prompt is messages; completion_ids: token
              ids; and as keyword lists every column of the row but prompt and images (id, data_source,
              answer, solution, ...), every key of its extra_info, `extra_info` itself and `ground_truth`
              (the answer). TRL's trainer_state, log_extra and log_metric are not passed.
    openrlhf  queries: templated prompt + response; prompts: the templated prompt; labels: the answers
    easyr1    {"response", "response_length" (tokens), "ground_truth"}
Results, per sample: a number, or a dict whose score key (home, verl: `score`; easyr1: `overall`) is the
score and whose other keys are logged; openrlhf may return {"rewards", "scores", "extra_logs"}. None
(TRL's "not applicable") is a failure here: verifiers are mapped per data source, so every sample of
its source must get a number.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Optional

from home_rl.errors import ConfigError

STYLES = ("home", "verl", "trl", "openrlhf", "easyr1")
SIGNATURES = {
    "home": "fn(response, ground_truth, *, data_source, extra_info)",
    "verl": "compute_score(data_source, solution_str, ground_truth, extra_info)",
    "trl": "reward_func(prompts, completions, completion_ids, **columns)",
    "openrlhf": "reward_func(queries, prompts, labels)",
    "easyr1": "compute_score(reward_inputs)",
}
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
VERL_BATCH_ARGS = ("data_sources", "solution_strs", "ground_truths", "extra_infos")
TRL_ARGS = ("prompts", "completions", "completion_ids")
HOME_KEYWORDS = ("data_source", "extra_info")


@dataclasses.dataclass(frozen=True)
class Convention:
    style: str  # home | verl | trl | openrlhf | easyr1 | remote
    batched: bool  # one call per chunk of samples (lists in, a list out) rather than one per sample
    asynchronous: bool = False  # an `async def`: awaited, and gathered with the chunk's other async calls
    keywords: Optional[tuple[str, ...]] = None  # verl: the verl argument names it accepts (None: all of them, **kwargs)


REMOTE = Convention("remote", batched=True)


def convention_of(fn: Callable, style: str = "", batched: bool = False, what: str = "verifier") -> Convention:
    """How to call `fn`: the given `style`, or the one its signature fits (ConfigError when none or several do).

    `batched`: the home style's batch form (@register_verifier(batched=True)); `what` names it in errors.
    """
    asynchronous = inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        if not style:
            raise ConfigError(f"{what}: cannot read its signature; give its style ({'|'.join(STYLES)})") from None
        sig = None
    if style:
        if style not in STYLES:
            raise ConfigError(f"{what}: unknown style {style!r}; expected one of {', '.join(STYLES)}")
        return _convention(style, sig, batched, asynchronous)
    fits = [s for s in STYLES if _FITS[s](_Params(sig), batched)]
    if len(fits) == 1:
        return _convention(fits[0], sig, batched, asynchronous)
    shown = f"{getattr(fn, '__name__', 'fn')}{sig}"
    if not fits:
        expected = "; ".join(f"{s}: {SIGNATURES[s]}" for s in STYLES)
        raise ConfigError(f"{what}: signature {shown} fits no calling style ({expected}); "
                          f"rename its parameters or give {{name: ..., style: ...}}")
    raise ConfigError(f"{what}: signature {shown} fits more than one calling style ({', '.join(fits)}); "
                      f"give {{name: ..., style: {fits[0]}}} (or {' or '.join(fits[1:])})")


class _Params:
    """The parts of a signature the styles are told apart by."""

    def __init__(self, sig: Optional[inspect.Signature]):
        params = list(sig.parameters.values()) if sig is not None else []
        kinds = inspect.Parameter
        self.names = [p.name for p in params if p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)]
        self.positional = [p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
        self.required = {p.name for p in params if p.default is p.empty
                         and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD)}
        self.var_positional = any(p.kind == kinds.VAR_POSITIONAL for p in params)
        self.var_keyword = any(p.kind == kinds.VAR_KEYWORD for p in params)
        self.keyword_names = {p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY)}

    def accepts(self, name: str) -> bool:
        return self.var_keyword or name in self.keyword_names


def _fits_verl(p: _Params, batched: bool) -> bool:
    for marker, args in (("solution_str", VERL_ARGS), ("solution_strs", VERL_BATCH_ARGS)):
        if marker in p.names and p.required <= set(args):
            return True
    return False


def _fits_trl(p: _Params, batched: bool) -> bool:
    return "completions" in p.names  # its other required arguments are data columns: the probe checks those


def _fits_openrlhf(p: _Params, batched: bool) -> bool:
    room = p.var_positional or len(p.positional) >= 3
    return "queries" in p.names and room and p.required <= set(p.positional[:3])


def _fits_easyr1(p: _Params, batched: bool) -> bool:
    return p.positional[:1] in (["reward_inputs"], ["reward_input"]) and p.required <= {p.positional[0]}


def _fits_home(p: _Params, batched: bool) -> bool:
    first_two = p.positional[:2]
    foreign = {"solution_str", "solution_strs", "completions", "queries", "reward_input", "reward_inputs"}
    keywords = ("data_sources", "extra_infos") if batched else HOME_KEYWORDS
    return ((len(first_two) == 2 or p.var_positional) and not set(first_two) & (foreign | set(keywords))
            and all(p.accepts(k) for k in keywords) and p.required <= set(first_two) | set(keywords))


_FITS = {"home": _fits_home, "verl": _fits_verl, "trl": _fits_trl, "openrlhf": _fits_openrlhf, "easyr1": _fits_easyr1}


def _convention(style: str, sig: Optional[inspect.Signature], batched: bool, asynchronous: bool) -> Convention:
    p = _Params(sig)
    if style == "verl":
        is_batch = "solution_strs" in p.names or any(a in p.names for a in VERL_BATCH_ARGS)
        args = VERL_BATCH_ARGS if is_batch else VERL_ARGS
        keywords = None if (p.var_keyword or sig is None) else tuple(a for a in args if a in p.keyword_names)
        return Convention("verl", is_batch, asynchronous, keywords)
    if style == "easyr1":
        return Convention("easyr1", p.positional[:1] != ["reward_input"], asynchronous)
    if style in ("trl", "openrlhf"):
        return Convention(style, True, asynchronous)
    return Convention("home", batched, asynchronous)


# ----------------------------------------------------------------------------- calling (the sandbox side)


def arguments(conv: Convention, items: list[dict], options: dict) -> tuple[tuple, dict]:
    """(args, kwargs) of one call on `items` (cleaned samples; one item unless the convention is batched)."""
    if conv.style == "home":
        if conv.batched:
            return ([s["response"] for s in items], [s["ground_truth"] for s in items]), {
                "data_sources": [s["data_source"] for s in items], "extra_infos": [s["extra_info"] for s in items],
                **options}
        s = items[0]
        return (s["response"], s["ground_truth"]), {"data_source": s["data_source"], "extra_info": s["extra_info"],
                                                    **options}
    if conv.style == "verl":
        if conv.batched:
            values = dict(zip(VERL_BATCH_ARGS, ([s["data_source"] for s in items], [s["response"] for s in items],
                                                [s["ground_truth"] for s in items], [s["extra_info"] for s in items])))
        else:
            s = items[0]
            values = dict(zip(VERL_ARGS, (s["data_source"], s["response"], s["ground_truth"], s["extra_info"])))
        keep = conv.keywords if conv.keywords is not None else tuple(values)
        return (), {k: values[k] for k in keep}
    if conv.style == "trl":
        return (), {"prompts": [s["prompt"] for s in items], "completions": [_completion(s) for s in items],
                    "completion_ids": [s["response_ids"] for s in items], **trl_columns(items)}
    if conv.style == "openrlhf":
        return ([s["prompt_text"] + s["response"] for s in items], [s["prompt_text"] for s in items],
                [s["ground_truth"] for s in items]), {}
    if conv.style == "easyr1":
        inputs = [{"response": s["response"], "response_length": s["response_length"],
                   "ground_truth": s["ground_truth"]} for s in items]
        return ((inputs if conv.batched else inputs[0]),), {}
    raise ValueError(f"no arguments for style {conv.style!r}")


def _completion(sample: dict) -> Any:
    """TRL's completion: the text, or one assistant message when the prompt is a conversation."""
    if isinstance(sample["prompt"], list):
        return [{"role": "assistant", "content": sample["response"]}]
    return sample["response"]


def trl_columns(items: list[dict]) -> dict[str, list]:
    """Every data column as a list over `items` (TRL passes the dataset's columns so): the row's columns, the keys of
    its extra_info, `extra_info` itself and `ground_truth`; a key some rows lack is None for them."""
    rows = [{**s["extra_info"], **s["columns"], "extra_info": s["extra_info"], "ground_truth": s["ground_truth"]}
            for s in items]
    keys = [k for k in dict.fromkeys(k for row in rows for k in row) if k not in TRL_ARGS and k != "prompt"]
    return {k: [row.get(k) for row in rows] for k in keys}


def per_sample(conv: Convention, value: Any, n: int) -> list[Any]:
    """The call's result as one raw result per sample: a number, None, or a dict with `score` and logged extras."""
    if conv.style in ("openrlhf", "remote") and isinstance(value, dict):
        return _reward_dict(value, n)
    if not conv.batched:
        values = [value]
    else:
        values = _as_list(value)
        if values is None or len(values) != n:
            shown = f"{len(values)} results" if values is not None else type(value).__name__
            raise TypeError(f"a {conv.style} reward function called on {n} samples must return a list of {n} results, "
                            f"got {shown}")
    if conv.style == "easyr1":
        return [_easyr1_score(v) for v in values]
    return values


def _as_list(value: Any) -> Optional[list]:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays, torch tensors
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None


def _reward_dict(value: dict, n: int) -> list[Any]:
    """OpenRLHF's {"rewards", "scores", "extra_logs"} (and the remote body's {"scores"}): per-sample dicts."""
    key = "rewards" if "rewards" in value else "scores" if "scores" in value else None
    if key is None:
        raise TypeError(f"a reward dict needs 'rewards' or 'scores', got keys {sorted(value)}")
    rewards = _as_list(value[key])
    if rewards is None or len(rewards) != n:
        shown = f"{len(rewards)} values" if rewards is not None else type(value[key]).__name__
        raise TypeError(f"'{key}' must be a list of {n} numbers, got {shown}")
    columns = {}
    if key == "rewards" and "scores" in value:
        columns["scores"] = _as_list(value["scores"])
    for name, logged in (value.get("extra_logs") or {}).items():
        columns[str(name)] = _as_list(logged)
    out = []
    for i, reward in enumerate(rewards):
        extras = {name: col[i] for name, col in columns.items() if col is not None and len(col) == n}
        out.append({"score": reward, **extras} if extras else reward)
    return out


def _easyr1_score(value: Any) -> Any:
    if isinstance(value, dict):
        if "overall" not in value:
            raise TypeError(f"an EasyR1 score needs 'overall', got keys {sorted(value)}")
        return {**{k: v for k, v in value.items() if k != "overall"}, "score": value["overall"]}
    return value
