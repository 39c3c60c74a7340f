"""A small TOML writer for the config dicts of the tests (tomllib only reads)."""
import json
import math


def value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {v!r} as TOML")


def dumps(config: dict) -> str:
    """Top-level values first, then tables, then arrays of tables."""
    tables = lambda v: isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
    lines = [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict) and not tables(v)]
    for k, v in config.items():
        if isinstance(v, dict):
            lines += [f"[{k}]"] + [f"{key} = {value(x)}" for key, x in v.items()]
    for k, v in config.items():
        if tables(v):
            for entry in v:
                lines += [f"[[{k}]]"] + [f"{key} = {value(x)}" for key, x in entry.items()]
    return "\n".join(lines) + "\n"
