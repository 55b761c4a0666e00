"""The argument types the examples share: argparse rejects a value out of range with one line
naming the argument and the range."""
import argparse
import math
from typing import Callable


def _number(cast, valid: Callable[..., bool], requirement: str):
    """An argparse type: cast(text), rejected unless valid (argparse names the argument)."""
    def parse(text: str):
        value = cast(text)
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text}")
        return value
    parse.__name__ = cast.__name__
    return parse


POSITIVE_INT = _number(int, lambda v: v > 0, "> 0")
POSITIVE_FLOAT = _number(float, lambda v: 0 < v < math.inf, "> 0 and finite")
PROBABILITY = _number(float, lambda v: 0 <= v < 1, "in [0, 1)")
