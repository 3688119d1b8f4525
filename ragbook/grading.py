"""What grading shares between the grader and the submission: cases, values, comparisons, and the
runner that executes a submission in its sandbox.

A graded case is a call: a function of the submission's, by name, on inputs the grader drew. The
submission's process (run by :func:`main`, inside :mod:`ragbook.sandbox`) only *computes*: it
executes the notebook's code cells, calls its functions on the inputs it is sent, and sends back
values. It never sees an expected value or a comparison; the grader compares, in its own process,
with the reference it computed there. A submission can therefore change anything in its own
process and gain nothing but the values it returns.

Values cross between the two as JSON (:func:`encode` / :func:`decode`): numbers, strings,
lists, dicts, tensors and arrays, nothing that could run code in the grader (no pickle).

While a submission runs, the package's reference for what it is asked to write is guarded
(:func:`guard_references`): called from anywhere but the package's own code, it raises, and its
source can be neither read nor re-executed.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACKAGE = Path(__file__).resolve().parent
TOLERANCE = 1e-5
UNAVAILABLE = "is not available while your answer is graded: write it yourself"


@dataclass
class Case:
    """One graded call: ``function(*args)`` in the submission, judged in the grader.

    ``reference`` gives the expected value (the grader calls it on the same ``args``); ``check``
    instead judges the value alone (``None`` when right, else what is wrong), for questions
    whose answer is a construction rather than a computation. ``grad``: positions of tensor
    arguments whose gradient (of the output's sum) is part of the value.
    """

    function: str
    args: tuple
    reference: Callable | None = None
    check: Callable[[Any], str | None] | None = None
    grad: tuple[int, ...] = ()
    tol: float = TOLERANCE
    label: str = field(default="")


# --------------------------------------------------------------------------- values


def encode(value: Any) -> Any:
    """A value as JSON: tensors, arrays, tuples, dicts and passages tagged, plain JSON as it
    is."""
    import numpy as np

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"t": "float", "v": repr(value)}
    if isinstance(value, np.generic):
        return encode(value.item())
    if isinstance(value, np.ndarray):
        return {"t": "ndarray", "dtype": str(value.dtype), "shape": list(value.shape),
                "v": [encode(x) for x in value.ravel().tolist()]}
    if type(value).__module__.startswith("torch") and hasattr(value, "detach"):
        flat = value.detach().cpu().float() if value.is_floating_point() else value.detach().cpu()
        return {"t": "tensor", "dtype": str(value.dtype).removeprefix("torch."),
                "shape": list(value.shape), "v": [encode(x) for x in flat.ravel().tolist()]}
    if isinstance(value, (list, tuple)):
        return {"t": type(value).__name__, "v": [encode(x) for x in value]}
    if type(value).__name__ == "Passage" and type(value).__module__ == "ragbook.data":
        return {"t": "passage", "v": [value.id, value.title, value.text]}
    if isinstance(value, dict):
        return {"t": "dict", "v": [[encode(k), encode(v)] for k, v in value.items()]}
    return {"t": "other", "v": type(value).__name__[:60]}


DTYPES = {"float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64",
          "uint8", "bool"}


def decode(obj: Any) -> Any:
    """The inverse of :func:`encode`, for JSON from an untrusted process: it builds only plain
    values, tensors and arrays. Raises ``ValueError`` on anything else."""
    import numpy as np
    import torch

    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        raise ValueError("an untagged list")
    if not isinstance(obj, dict):
        raise ValueError(f"not a value: {type(obj).__name__}")
    tag, items = obj.get("t"), obj.get("v")
    if tag == "float":
        if items not in ("nan", "inf", "-inf"):
            raise ValueError("a float that is not a float")
        return float(items)
    if tag == "other":
        return Unencodable(str(items))
    if not isinstance(items, list):
        raise ValueError(f"a {tag!r} without items")
    if tag in ("tensor", "ndarray"):
        dtype, shape = obj.get("dtype"), obj.get("shape")
        dtype = "float32" if tag == "ndarray" and dtype not in DTYPES else dtype
        if dtype not in DTYPES or not isinstance(shape, list) or not all(
                isinstance(n, int) and n >= 0 for n in shape) or math.prod(shape) != len(items):
            raise ValueError(f"a malformed {tag}")
        flat = [decode(x) for x in items]
        if tag == "ndarray":
            return np.array(flat, dtype=dtype).reshape(shape)
        return torch.tensor(flat, dtype=getattr(torch, dtype)).reshape(shape)
    if tag == "passage":
        from .data import Passage

        if len(items) != 3 or not all(isinstance(x, str) for x in items):
            raise ValueError("a malformed passage")
        return Passage(*items)
    if tag in ("list", "tuple"):
        values = [decode(x) for x in items]
        return values if tag == "list" else tuple(values)
    if tag == "dict":
        pairs = [(decode(k), decode(v)) for k, v in items]
        if not all(isinstance(k, (str, int, float, bool, tuple, type(None))) for k, _ in pairs):
            raise ValueError("a dict with unhashable keys")
        return dict(pairs)
    raise ValueError(f"unknown tag {tag!r}")


@dataclass(frozen=True)
class Unencodable:
    """What came back for a value :func:`encode` cannot carry: its type's name."""

    kind: str


def short(value: Any, width: int = 120) -> str:
    """A value as a learner reads it in a public test's message."""
    if hasattr(value, "detach") and hasattr(value, "shape"):
        value = value.detach()
        text = f"tensor of shape {tuple(value.shape)}: {value.tolist()}" if value.dim() else \
            f"tensor({value.item():.6g})"
    elif isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, Unencodable):
        text = f"a {value.kind}"
    else:
        text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


# --------------------------------------------------------------------------- calls and comparisons


def probe(function: Callable, args: Sequence, grad: Sequence[int] = ()) -> Any:
    """Call ``function(*args)``: its value, or with ``grad`` the pair (value, gradients of the
    value's sum with respect to those arguments). The grader runs the same on its reference."""
    if not grad:
        return function(*args)
    import torch

    args = [a.detach().clone().requires_grad_(True) if i in grad else a
            for i, a in enumerate(args)]
    value = function(*args)
    if not isinstance(value, torch.Tensor) or not value.requires_grad:
        return value, [None] * len(grad)
    value.sum().backward()
    return value, [args[i].grad for i in grad]


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if hasattr(value, "shape") and hasattr(value, "tolist") and tuple(value.shape) == ():
        item = value.tolist()
        return float(item) if isinstance(item, (int, float)) and not isinstance(item, bool) \
            else None
    return None


def compare(got: Any, expected: Any, tol: float = TOLERANCE) -> str | None:
    """``None`` when ``got`` matches ``expected`` (numbers within ``tol``, relative and absolute;
    tensors and arrays in shape and every element; containers item by item), else what differs,
    as "expected …, got …"."""
    import numpy as np
    import torch

    def differs(what: str = "") -> str:
        return f"{what}expected {short(expected)}, got {short(got)}"

    if isinstance(expected, (torch.Tensor, np.ndarray)) and tuple(expected.shape):
        if not isinstance(got, (torch.Tensor, np.ndarray)):
            return differs()
        a = torch.as_tensor(np.asarray(got) if isinstance(got, np.ndarray) else got.detach())
        b = torch.as_tensor(np.asarray(expected) if isinstance(expected, np.ndarray)
                            else expected.detach())
        if tuple(a.shape) != tuple(b.shape):
            return f"expected shape {tuple(b.shape)}, got shape {tuple(a.shape)}"
        if a.dtype == torch.bool or b.dtype == torch.bool or not (
                a.is_floating_point() or b.is_floating_point()):
            return None if torch.equal(a.long(), b.long()) else differs()
        ok = torch.allclose(a.double(), b.double(), rtol=tol, atol=tol, equal_nan=True)
        return None if ok else differs()
    number = _as_number(expected)
    if number is not None:
        mine = _as_number(got)
        if mine is None:
            return differs()
        if isinstance(expected, int) and not isinstance(expected, bool) and isinstance(got, int):
            return None if mine == number else differs()
        both_nan = math.isnan(mine) and math.isnan(number)
        return None if both_nan or math.isclose(mine, number, rel_tol=tol, abs_tol=tol) \
            else differs()
    if isinstance(expected, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(expected):
            return differs()
        for i, (a, b) in enumerate(zip(got, expected)):
            if (why := compare(a, b, tol)) is not None:
                return f"item {i}: {why}"
        return None
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            return differs("keys: ") if isinstance(got, dict) else differs()
        for key in expected:
            if (why := compare(got[key], expected[key], tol)) is not None:
                return f"[{key!r}]: {why}"
        return None
    return None if type(got) is type(expected) and got == expected else differs()


def expect(function: Callable, args: str, expected: str, tol: float = TOLERANCE) -> None:
    """A public test: ``function(<args>)`` should equal ``<expected>``; both are Python source,
    evaluated with ``math``, ``torch``, ``numpy as np`` and ``Passage`` in scope (the grader
    evaluates the same text in its own process). Fails with what was expected and what came."""
    scope = _scope()
    got = function(*eval(f"({args},)", scope))
    want = eval(expected, scope)
    if (why := compare(got, want, tol)) is not None:
        raise AssertionError(f"{function.__name__}({args}): {why}")


def _scope() -> dict:
    import numpy as np
    import torch

    from .data import Passage

    return {"math": math, "torch": torch, "np": np, "Passage": Passage}


def public_case(function: str, args: str, expected: str, tol: float = TOLERANCE) -> Case:
    """A public test's :func:`expect` as a case the grader judges."""
    scope = _scope()
    return Case(function, eval(f"({args},)", scope),
                reference=lambda *_: eval(expected, scope), tol=tol, label=f"{function}({args})")


def public_tests(source: str) -> list[tuple[str, str, str, float]]:
    """The ``expect(name, "args", "expected"[, tol])`` calls in a public test's source, as
    (name, args, expected, tol)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "expect":
            name = node.args[0].id
            args, expected = (ast.literal_eval(a) for a in node.args[1:3])
            tol = ast.literal_eval(node.args[3]) if len(node.args) > 3 else TOLERANCE
            found.append((name, args, expected, float(tol)))
    return found


def draw_rag_inputs(g, batch: int | None = None, k: int | None = None,
                    length: int | None = None) -> tuple:
    """Random inputs of a marginalization, for hidden tests: per-token log-probabilities
    (batch, k, T), a target mask true up to a random length per example, and unnormalised doc
    scores (batch, k); sizes not given are drawn too (``g``: a ``torch.Generator``)."""
    import torch

    def size(given: int | None, low: int, high: int) -> int:
        return given or int(torch.randint(low, high, (1,), generator=g))

    batch, k, length = size(batch, 1, 5), size(k, 1, 7), size(length, 1, 12)
    logprobs = torch.randn(batch, k, length, generator=g).log_softmax(-1) * 3
    mask = torch.arange(length) < torch.randint(1, length + 1, (batch, 1), generator=g)
    return logprobs, mask, torch.randn(batch, k, generator=g) * 4


# --------------------------------------------------------------------------- the reference guard


class ReferenceUnavailable(RuntimeError):
    """The package's reference was called from a submission's code."""


def guard_references(names: Sequence[str]) -> None:
    """Make each ``module.function`` in ``names`` unusable from outside the package: a call from
    any code but ragbook's own raises :class:`ReferenceUnavailable` (every alias of the function
    object is the same object, so ``import ... as`` does not escape), and an audit hook refuses
    to open or re-execute the modules' source (``importlib.reload``, ``inspect.getsource``)."""
    import importlib

    originals: dict[str, Callable] = {}
    files: set[str] = set()
    for dotted in names:
        module_name, function_name = dotted.rsplit(".", 1)
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
        original = types.FunctionType(function.__code__, function.__globals__, function_name,
                                      function.__defaults__)
        original.__kwdefaults__ = function.__kwdefaults__
        originals[dotted] = original
        files.add(os.path.realpath(module.__file__))
        module.__dict__.setdefault("_ragbook_guard", _Guard(originals))
        stub = {}
        exec(f"def {function_name}(*args, **kwargs):\n"
             f"    return _ragbook_guard({dotted!r}, args, kwargs)", stub)
        function.__code__ = stub[function_name].__code__
    compiled = {(os.path.join(os.path.dirname(f), "__pycache__"), Path(f).stem) for f in files}

    def audit(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(args[0]))
            cached = (os.path.dirname(path), os.path.basename(path).split(".")[0])
            if path in files or cached in compiled:
                raise PermissionError(f"{path} {UNAVAILABLE}")
        elif event == "exec" and getattr(args[0], "co_filename", None) in files:
            raise PermissionError(f"{args[0].co_filename} {UNAVAILABLE}")

    sys.addaudithook(audit)


class _Guard:
    """Calls a guarded reference for ragbook's own code; refuses everyone else, this module
    too (it calls the submission's functions, which may be a reference under another name)."""

    def __init__(self, originals: dict[str, Callable]):
        self._originals = originals

    def __call__(self, dotted: str, args: tuple, kwargs: dict) -> Any:
        caller = os.path.realpath(sys._getframe(2).f_code.co_filename)
        if not caller.startswith(str(PACKAGE) + os.sep) or caller == os.path.realpath(__file__):
            raise ReferenceUnavailable(f"{dotted} {UNAVAILABLE}")
        return self._originals[dotted](*args, **kwargs)


# --------------------------------------------------------------------------- the submission's side


def cell_code(source: str) -> str:
    """A code cell as plain Python: IPython's ``%magic`` and ``!shell`` lines become ``pass``."""
    return "\n".join(re.sub(r"^(\s*)[%!].*$", r"\1pass", line) for line in source.splitlines())


class _Otter(types.ModuleType):
    """``otter`` in a submission's sandbox: ``otter.Notebook(...).check(...)`` does nothing (the
    grader, not the notebook, runs the tests) and nothing else of otter's exists."""

    class Notebook:
        def __init__(self, *args, **kwargs):
            pass

        def check(self, *args, **kwargs) -> None:
            return None

        def check_all(self, *args, **kwargs) -> None:
            return None

        def export(self, *args, **kwargs) -> None:
            return None


def run_submission(request: dict) -> dict:
    """Execute the request's cells in order (a cell that raises is recorded and the next one
    runs, as in a notebook run top to bottom), then make its calls: ``{"cells": [errors],
    "calls": [{"value": ...} or {"error": ...}]}``."""
    sys.modules["otter"] = _Otter("otter")
    guard_references(request.get("forbid", []))
    namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
    errors = []
    for i, source in enumerate(request["cells"]):
        try:
            exec(compile(cell_code(source), f"<cell {i}>", "exec"), namespace)
        except BaseException as e:  # SystemExit and KeyboardInterrupt too: the next cell runs
            errors.append(f"cell {i}: {type(e).__name__}: {e}"[:300])
    results = []
    for call in request["calls"]:
        function = namespace.get(call["function"])
        if not callable(function):
            results.append({"error": f"NameError: no function {call['function']}()"})
            continue
        try:
            args = decode(call["args"])
            results.append({"value": encode(probe(function, args, call.get("grad", ())))})
        except BaseException as e:
            results.append({"error": f"{type(e).__name__}: {e}"[:300]})
    return {"cells": errors, "calls": results}


def main() -> None:
    """The sandbox's entry point: a request (JSON) on stdin, the response on stdout. The
    submission's own prints go to stderr; it never holds the response's descriptor by name."""
    request = json.loads(sys.stdin.buffer.read())
    os.environ.setdefault("MPLBACKEND", "Agg")
    response = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdin = open(os.devnull)
    result = run_submission(request)
    response.write(json.dumps(result))
    response.flush()
    os._exit(0)  # no atexit handler or thread of the submission's runs after this


if __name__ == "__main__":
    main()
