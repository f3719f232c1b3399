"""W&B sweep definitions over AdaCS's settings, and their expansion into ``adacs-train`` commands.

The sweep files ship with the package (``bayes``, ``grid_alpha_beta``)::

    wandb sweep $(python -m adacs_lightning.sweeps --path bayes)     # prints <sweep id>
    wandb agent <entity>/<project>/<sweep id>
    python -m adacs_lightning.sweeps bayes --count 4                 # the commands an agent would run

An agent builds each run's command from the sweep's ``command`` list: ``${env}`` becomes
``/usr/bin/env``, ``${program}`` the sweep's ``program``, and ``${args_no_hyphens}`` the
``key=value`` of every parameter (W&B's own ``create_sweep_command_args``). :func:`command_line`
does the same without a W&B server, for checking a sweep file or for a scheduler of your own.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

#: The sweep files shipped with the package, by name.
SWEEP_NAMES = ("bayes", "grid_alpha_beta")


def sweep_path(name: str) -> Path:
    """The path of a shipped sweep file (``bayes``, ``grid_alpha_beta``), or ``name`` itself if it is a file."""
    if Path(name).is_file():
        return Path(name)
    path = Path(str(resources.files(__name__).joinpath(f"{name}.yaml")))
    if not path.is_file():
        raise FileNotFoundError(f"no sweep named '{name}': choose one of {', '.join(SWEEP_NAMES)} or give a YAML file")
    return path


def _sample(spec: Mapping[str, Any], rng: random.Random) -> Any:
    """One value of a parameter spec (``value``, ``values`` or a ``distribution``)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(list(spec["values"]))
    distribution = spec.get("distribution", "uniform")
    low, high = float(spec["min"]), float(spec["max"])
    if distribution in ("uniform",):
        return rng.uniform(low, high)
    if distribution in ("log_uniform_values",):
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if distribution in ("int_uniform",):
        return rng.randint(int(low), int(high))
    if distribution in ("q_uniform",):
        q = float(spec.get("q", 1.0))
        return round(rng.uniform(low, high) / q) * q
    raise ValueError(f"unsupported distribution {distribution!r}")


def parameter_sets(sweep: Mapping[str, Any], count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Parameter assignments in the order an agent would run them.

    ``grid`` enumerates every combination; ``random`` and ``bayes`` draw ``count``
    independent samples (a Bayesian agent's first proposals are random draws too).
    """
    parameters = sweep["parameters"]
    names = list(parameters)
    if sweep.get("method") == "grid":
        choices = []
        for name in names:
            spec = parameters[name]
            if "values" not in spec and "value" not in spec:
                raise ValueError(f"a grid sweep needs 'values' for every parameter; '{name}' has {sorted(spec)}")
            choices.append(list(spec["values"]) if "values" in spec else [spec["value"]])
        combos = itertools.product(*choices)
        yield from (dict(zip(names, combo)) for combo in itertools.islice(combos, count))
        return
    rng = random.Random(seed)
    for _ in range(count or 1):
        yield {name: _sample(parameters[name], rng) for name in names}


def command_line(sweep: Mapping[str, Any], assignment: Mapping[str, Any]) -> list[str]:
    """The command a W&B agent runs for ``assignment``, built as the agent builds it.

    The argument forms come from W&B's ``create_sweep_command_args``; each ``${name}`` token of
    the sweep's ``command`` is replaced by its list (``env``: ``/usr/bin/env``, ``interpreter``:
    ``python``, ``program``: the sweep's ``program``), other tokens kept as they are.
    """
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    variables: dict[str, list[str]] = dict(
        create_sweep_command_args({"args": {k: {"value": v} for k, v in assignment.items()}})
    )
    variables.update({"env": ["/usr/bin/env"], "interpreter": ["python"], "program": [str(sweep["program"])]})
    command: list[str] = []
    for token in create_sweep_command(list(sweep.get("command") or [])):
        token = str(token)
        if token.startswith("${") and token.endswith("}"):
            command += variables.get(token[2:-1]) or []
        else:
            command.append(token)
    return command


def load_sweep(path: str | Path) -> dict[str, Any]:
    """A sweep file (a path, or the name of a shipped sweep) as a dict."""
    with sweep_path(str(path)).open() as handle:
        return yaml.safe_load(handle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help=f"a W&B sweep YAML file, or one of {', '.join(SWEEP_NAMES)}")
    parser.add_argument("--path", action="store_true", help="print the sweep file's path (for wandb sweep)")
    parser.add_argument("--count", type=int, default=None, help="commands to print (grid: all by default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.path:
        print(sweep_path(args.sweep))
        return
    sweep = load_sweep(args.sweep)
    for assignment in parameter_sets(sweep, args.count, args.seed):
        print(" ".join(command_line(sweep, assignment)))
