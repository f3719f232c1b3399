"""Expand a W&B sweep definition into ``adacs-train`` command lines, the way a W&B agent would.

W&B agents fill ``${args_no_hyphens}`` with ``key=value`` for each parameter and
``${env}`` with ``/usr/bin/env``. This module does the same without a W&B server: for
checking sweep files, or for running a sweep's commands on a scheduler of your own::

    python -m adacs_lightning.sweeps conf/sweep/grid_alpha_beta.yaml --count 4
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml


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
    """The sweep's ``command`` with ``${env}``, ``${program}`` and ``${args_no_hyphens}`` filled in."""
    args = [f"{name}={value}" for name, value in assignment.items()]
    hyphenated = [f"--{arg}" for arg in args]
    command: list[str] = []
    for token in sweep.get("command", ["${env}", "${interpreter}", "${program}", "${args}"]):
        if token == "${env}":
            command.append("/usr/bin/env")
        elif token == "${program}":
            command.append(str(sweep["program"]))
        elif token == "${interpreter}":
            command.append("python")
        elif token == "${args_no_hyphens}":
            command.extend(args)
        elif token == "${args}":
            command.extend(hyphenated)
        else:
            command.append(str(token))
    return command


def load_sweep(path: str | Path) -> dict[str, Any]:
    with open(path) as handle:
        return yaml.safe_load(handle)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", help="a W&B sweep YAML file")
    parser.add_argument("--count", type=int, default=None, help="commands to print (grid: all by default)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sweep = load_sweep(args.sweep)
    for assignment in parameter_sets(sweep, args.count, args.seed):
        print(" ".join(command_line(sweep, assignment)))


if __name__ == "__main__":
    main()
