"""Reading a config: YAML (strict: a key given twice is an error, an alias bomb is refused) and ``key=value``
overrides, each value coerced to its field's type, TRL's names mapped (:mod:`preftune.config.compat`), the whole
validated once; an error names the file and line the key came from."""

from __future__ import annotations

import decimal
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from preftune.config.compat import ALIASES, TRL_KEYS, from_trl_loss_type
from preftune.config.train import FIELDS, TrainConfig
from preftune.errors import ConfigError, config_error, shown


def _union_members(hint: Any) -> tuple:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _as(option: Any, value: Any) -> tuple[bool, Any]:
    """Try to read ``value`` as type ``option``; ``(ok, converted)``."""
    if option is type(None):
        return value is None, None
    if option is Any:
        return True, value
    if option is bool:
        return isinstance(value, bool), value
    if option is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return True, value
        whole = _whole_number(value)  # 1e3 (a string to YAML 1.1) or 1.0e+3 is 1000 steps
        return whole is not None, whole
    if option is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return True, float(value)
            except ValueError:
                return False, None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, None
    if option is str:
        return isinstance(value, str), value
    if typing.get_origin(option) is Literal:
        return value in typing.get_args(option), value
    if typing.get_origin(option) is list and isinstance(value, list):
        (item,) = typing.get_args(option)
        converted = [_as(item, v) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if typing.get_origin(option) is dict and isinstance(value, dict):
        return all(isinstance(k, str) for k in value), dict(value)
    return False, None


def _coerce(name: str, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's declared type, or say what was expected."""
    hint = typing.get_type_hints(TrainConfig)[name]
    if name == "report_to" and isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    if name == "report_to" and value is None:
        value = []
    for option in _union_members(hint):
        ok, converted = _as(option, value)
        if ok:
            return converted
    one = "; give one value (run once per value to compare several)" if isinstance(value, (list, dict)) else ""
    raise config_error(name, f"{name} must be {_type_name(hint)}, got {shown(value)}{one}")


def _whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a float or a numeric string with an integral value (``1e3``, ``"2.0e+2"``)."""
    if isinstance(value, bool) or not isinstance(value, (float, str)):
        return None
    try:
        number = decimal.Decimal(value.strip() if isinstance(value, str) else value)
    except (decimal.InvalidOperation, ValueError):
        return None
    # An exponent bound first: int(Decimal("1e999999999")) would build a billion-digit number.
    if not number.is_finite() or number.adjusted() > 18 or number != number.to_integral_value():
        return None
    return int(number)


def _type_name(hint: Any) -> str:
    """What a type hint accepts, in words: ``int | None`` → "a whole number or null"."""
    if hint is type(None):
        return "null"
    if hint is Any:
        return "any value"
    words = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    if hint in words:
        return words[hint]
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return f"a list of {_type_name(item).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping of names to values"
    members = _union_members(hint)
    if len(members) > 1:
        return " or ".join(_type_name(m) for m in members)
    return str(hint).replace("typing.", "")


class _StrictLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error, not "the last one wins"."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *defaults` then overriding a merged key is YAML's way to override
            key = self.construct_object(key_node, deep=True)
            try:
                first = lines.get(key)
            except TypeError:  # an unhashable key: SafeLoader refuses it below, with its own message
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1}); "
                    "YAML would keep the last value without a word: keep one", key_node.start_mark)
            lines[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(err: yaml.YAMLError, where: str, lines: bool) -> ConfigError:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    if mark is not None:
        where = f"{where}, line {mark.line + 1}, column {mark.column + 1}" if lines else where
    context, context_mark = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1})" if lines else f" ({context})"
    if isinstance(err, yaml.constructor.ConstructorError) and "given twice" in problem:
        return ConfigError(f"{where}: {problem}")
    return ConfigError(f"{where}: invalid YAML: {problem}; fix the syntax " + _QUOTES_HINT)


_QUOTES_HINT = "(a value holding ':', '#', '[' or '{' needs quotes)"

# Values a config may expand to, aliases counted each time they appear: far above any real config, far below a
# "billion laughs" document (nine aliases of nine aliases … expand to millions of values from a few lines).
_MAX_VALUES = 100_000


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """The number of values ``node`` constructs to, each alias counted in full (memoised per node: linear time);
    stops counting past :data:`_MAX_VALUES`."""
    if id(node) in sizes:
        return sizes[id(node)]
    sizes[id(node)] = _MAX_VALUES + 1  # a node that contains itself expands without end
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    sizes[id(node)] = min(size, _MAX_VALUES + 1)
    return sizes[id(node)]


def _load_yaml(text: str, where: str, lines: bool = True) -> tuple[Any, dict[str, int]]:
    """The document in ``text`` and the 1-based line of each top-level key (``lines``: name lines in errors)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > _MAX_VALUES:
            raise ConfigError(f"{where}: the YAML expands to more than {_MAX_VALUES:,} values (each *alias repeats "
                              "its anchor's value); a config holds a few dozen keys: remove the nested aliases")
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as err:
        raise _yaml_error(err, where, lines) from None
    except RecursionError:
        raise ConfigError(f"{where}: the YAML is nested too deeply to read; a config is a flat mapping of keys "
                          "(lr_scheduler_kwargs and the like hold one more level)") from None
    finally:
        loader.dispose()
    lines = {}
    if isinstance(node, yaml.MappingNode):
        lines = {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}
    return data, lines


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {shown(text)} is not of the form key=value (e.g. beta=0.1)")
    key, raw = text.split("=", 1)
    value = _load_yaml(raw, f"override {shown(text)}", lines=False)[0] if raw.strip() else None
    return key.strip(), value


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Validate a mapping of keys to values into a :class:`TrainConfig` (unknown keys suggest the closest)."""
    kwargs: dict[str, Any] = {}
    given: dict[str, str] = {}
    strategies: dict[str, Any] = {}
    for key, value in values.items():
        name = ALIASES.get(key, key)
        if name not in FIELDS and key in TRL_KEYS:
            trl = TRL_KEYS[key]
            if trl.accepts is not None and trl.accepts(value):
                strategies[key] = value  # says what preftune does anyway (strategies imply some defaults)
                continue
            what = f"with value {shown(value)} has" if trl.accepts else "has"
            what += " no preftune equivalent"
            raise config_error(key, f"config key '{key}' (TRL / transformers) {what}: {trl.advice}")
        if key == "loss_type":
            value = from_trl_loss_type(value)
        if name not in FIELDS:
            close = difflib.get_close_matches(str(key), [*FIELDS, *ALIASES], n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise config_error(key, f"unknown config key {shown(key)}.{hint} (`preftune config` lists every key)")
        if name in given:
            alias = key if key in ALIASES else given[name]
            raise config_error((given[name], key), f"both '{given[name]}' and '{key}' are given; '{alias}' is another "
                               f"name for '{name}': give one")
        given[name] = key
        kwargs[name] = _coerce(name, value)
    _apply_strategies(strategies, kwargs, given)
    return TrainConfig(**kwargs).validate()


def _apply_strategies(strategies: dict[str, Any], kwargs: dict[str, Any], given: dict[str, str]) -> None:
    """What transformers' strategy keys imply when their numbers are not given: ``eval_strategy: steps`` evaluates
    every ``logging_steps`` steps, on ``dataset_test_split`` of the training dataset (TRL's scripts); ``save_strategy:
    steps`` saves every 500 steps; ``save_strategy: no`` saves no checkpoint."""
    evaluation = strategies.get("eval_strategy", strategies.get("evaluation_strategy"))
    if evaluation == "steps":
        kwargs.setdefault("eval_steps", kwargs.get("logging_steps", FIELDS["logging_steps"].default))
        if given.get("eval_split") == "dataset_test_split" and kwargs.get("eval_dataset") is None:
            kwargs["eval_dataset"] = kwargs.get("dataset")
    if evaluation == "no" and (kwargs.get("eval_dataset") or kwargs.get("eval_split_size")):
        key = given.get("eval_dataset") or given.get("eval_split_size")
        raise config_error(key, f"eval_strategy: no, but {key} is given: preftune evaluates whenever there is "
                           "evaluation data; remove one of them")
    saving = strategies.get("save_strategy")
    if saving == "steps":
        kwargs.setdefault("save_steps", 500)
    if saving == "no" and kwargs.get("save_steps") is not None:
        raise config_error(given["save_steps"], "save_strategy: no, but save_steps is given; remove one of them")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Read a YAML file (optional), apply ``key=value`` overrides, validate.

    An error about a value read from the file names the file and the key's line: ``run.yaml, line 4: …``."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a YAML file" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {path} {what}; give the path of a YAML file of config keys "
                              "(`preftune config` lists them)")
        loaded, lines = _load_yaml(_read_text(path), str(path))
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys (key: value per line), "
                              f"got {type(loaded).__name__}")
        values.update(loaded)
        origins = {key: f"{path}, line {line}" for key, line in lines.items()}
    for text in overrides:
        key, value = _parse_override(text)
        for other in _spellings(key):  # an override replaces the file's value, under either spelling
            values.pop(other, None)
            origins.pop(other, None)
        values[key] = value
    try:
        return build_config(values)
    except ConfigError as err:
        keys = getattr(err, "config_keys", ())
        spelled = {spelling: origin for key, origin in origins.items() for spelling in _spellings(key)}
        where = list(dict.fromkeys(spelled[k] for k in keys if k in spelled))
        if not where:
            raise
        located = config_error(keys, f"{'; '.join(where)}: {err}")
        raise located from None


def _spellings(key: str) -> set[str]:
    """A key and its alias: ``{"loss_type", "method"}``."""
    name = ALIASES.get(key, key)
    return {name, *(alias for alias, target in ALIASES.items() if target == name)}


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[err.start]:02x}); save the file "
                          "as UTF-8") from None

