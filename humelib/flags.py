"""The command line every script shares: a parser whose errors are one line and exit code 2, and the flag types
(argparse type=) that read numbers, seeds and devices the same way in every script, each message naming the flag.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

import torch

from humelib.runtime import HumeError


class Parser(argparse.ArgumentParser):
    """argparse with the project's error convention: one line on stderr, exit code 2 (argparse prints usage too);
    with exit_on_error=False (humelib.api) a HumeError instead. A flag's bad value reads "--flag must be ..., got
    ..." (the flag types below phrase their messages so)."""

    def error(self, message: str) -> NoReturn:
        message = re.sub(r"^argument (\S+?)(?:/\S+)?: ", r"\1 ", " ".join(message.split()))
        if not self.exit_on_error:
            raise HumeError(message)
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def make_parser(doc: str, exit_on_error: bool = True) -> Parser:
    """A parser whose description is the first paragraph of the script's docstring; defaults shown in --help."""
    # allow_abbrev=False: a typo such as --num_iter must not silently become --num_iters
    return Parser(description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                  allow_abbrev=False, exit_on_error=exit_on_error)


def report_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--json and --quiet, alike in every script that prints a report (evaluate, annotate, baselines, select_k);
    `what`: what the JSON file gets."""
    p.add_argument("--json", help=f"also write {what} to this JSON file")
    p.add_argument("--quiet", action="store_true", help="print no progress bar, table or message (warnings and "
                   "errors still go to stderr)")


# ---------------------------------------------------------------- flag types

NUMBER = re.compile(r"[+-]?(?:inf|infinity|nan|(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[+-]?[0-9]+)?)", re.IGNORECASE)


def _float(text: str) -> float:
    """An ASCII decimal number (float() also takes '١٢', '1_0' and spaces: a flag value must read the same
    everywhere), finite."""
    if not NUMBER.fullmatch(text):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {value}")
    return value


def finite_float(text: str) -> float:
    return _float(text)


def positive_float(text: str) -> float:
    value = _float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def int_in(lo: int, hi: int | None = None, what: str | None = None) -> Callable[[str], int]:
    """The argparse type of an integer flag in [lo, hi]: ASCII digits with an optional sign only (int() also
    takes '١٢', '1_000' and spaces; '²'.isdigit() is true but int('²') fails)."""
    bounds = what or (f">= {lo}" if hi is None else f"between {lo} and {hi}")

    def parse(text: str) -> int:
        if not re.fullmatch(r"[+-]?[0-9]+", text):
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {text!r}")
        value = int(text)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {value}")
        return value
    parse.__name__ = f"int_{bounds}"
    return parse


seed_int = int_in(0, 2 ** 32 - 1, "between 0 and 2**32 - 1 (numpy's range)")  # every --seed


def int_list(lo: int) -> Callable[[str], list[int]]:
    """The argparse type of a comma list of integers >= lo ("100,300")."""
    one = int_in(lo)

    def parse(text: str) -> list[int]:
        return [one(t) for t in text.split(",")]
    parse.__name__ = f"comma list of integers >= {lo}"
    return parse


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """The argparse type of a comma list of names from choices ("adjoint,bf16")."""
    def parse(text: str) -> list[str]:
        names = text.split(",")
        bad = [n for n in names if n not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"must be a comma list of {', '.join(choices)}, got {bad[0]!r}")
        return names
    return parse


def device_problem(name: str) -> str | None:
    """What is wrong with torch device name here ("NAME: reason; fix"), or None: cpu, cuda[:i] when CUDA and that
    device are there, mps when available."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        return f"{name}: not a torch device; use cpu or cuda"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{name}: CUDA is not available here; use --device cpu"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{name}: only {torch.cuda.device_count()} CUDA device(s) here; use cuda:0"
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            return f"{name}: MPS is not available here; use --device cpu"
    elif dev.type != "cpu":
        return f"{name}: HUME runs on cpu, cuda or mps, not {dev.type}"
    return None


def device(text: str) -> str:
    """The argparse type of --device: a device that exists here."""
    problem = device_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
