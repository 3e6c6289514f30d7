"""Call a reward function so that whatever it does, its sample gets a reward and a reason, and the run goes on.

`safe_reward(fn, *args, timeout_s=..., **kwargs) -> (reward, reason)` runs `fn(*args, **kwargs)` in a worker thread
and waits at most `timeout_s` for it:

- it returns a finite number, or a `(number, reason)` pair (the domains' `score` functions): that reward, with the
  reason it gave (or "reward function returned <value>");
- it raises: `(0.0, "reward function raised <Type>: <message>")`, and the traceback is logged on the
  "dsv4train.rewards" logger;
- it is still running after `timeout_s`: `(0.0, "reward function timed out after N s")`, logged;
- it returns something else (None, a string, NaN, infinity, a pair with a non-string reason): `(0.0, a reason
  naming the value)`, logged.

A thread is used because it works for any callable and costs nothing when the function is quick. A Python thread
cannot be killed: a timed-out function keeps running (a daemon thread, so it does not keep the process alive at
exit) and its result is dropped. Reward functions that may not end (running generated code) belong in a subprocess
that can be killed: the code domain's judge runs its candidates through `dsv4train.posttrain.rewards.sandbox`, which
kills the whole process group at its own timeout, so `safe_reward` is then the second line, not the first.
"""

from __future__ import annotations

import logging
import math
import numbers
import threading
from collections.abc import Callable
from typing import Any

_LOG = logging.getLogger("dsv4train.rewards")


def safe_reward(fn: Callable[..., Any], *args: Any, timeout_s: float, **kwargs: Any) -> tuple[float, str]:
    """(reward, reason) of `fn(*args, **kwargs)`, 0.0 with the cause when it raises, times out or returns no
    finite number (module docstring)."""
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=_call, args=(fn, args, kwargs, outcome), daemon=True, name="safe-reward")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        reason = f"reward function timed out after {timeout_s:g} s"
        _LOG.warning("%s (%s keeps running in its thread; it cannot be killed)", reason, _name(fn))
        return 0.0, reason
    if "error" in outcome:
        error = outcome["error"]
        reason = f"reward function raised {type(error).__name__}: {error}"
        _LOG.error("%s (%s)", reason, _name(fn), exc_info=(type(error), error, error.__traceback__))
        return 0.0, reason
    reward, reason = _as_reward(outcome["value"])
    if reward is None:
        _LOG.warning("%s (%s)", reason, _name(fn))
        return 0.0, reason
    return reward, reason


def _call(fn: Callable[..., Any], args: tuple, kwargs: dict, outcome: dict[str, Any]) -> None:
    try:
        outcome["value"] = fn(*args, **kwargs)
    except BaseException as error:  # SystemExit from a library's sys.exit() too: the reward must not end the run
        outcome["error"] = error


def _as_reward(value: Any) -> tuple[float | None, str]:
    """(the reward, its reason) of what a reward function returned, or (None, why it is not one)."""
    reason = None
    if isinstance(value, tuple) and len(value) == 2:
        value, reason = value
        if not isinstance(reason, str):
            return None, f"reward function returned a reason that is not a string: {_show(reason)}"
    number = _as_number(value)
    if number is None:
        return None, f"reward function returned {_show(value)}, not a number"
    if not math.isfinite(number):
        return None, f"reward function returned {number}, not a finite number"
    return number, reason if reason is not None else f"reward function returned {number:g}"


def _as_number(value: Any) -> float | None:
    """A float from a real number (bool, int, float, a NumPy scalar) or a one-element tensor/array; None else."""
    if not isinstance(value, numbers.Real) and not hasattr(value, "__float__"):
        return None  # str has no __float__ (float("1") parses it): text is not a reward
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None  # e.g. an array of more than one element


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as error:  # a broken __repr__ must not turn a reason into a crash
        text = f"<{type(value).__name__} whose repr raised {type(error).__name__}>"
    return text if len(text) <= 100 else text[:100] + "..."


def _name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
