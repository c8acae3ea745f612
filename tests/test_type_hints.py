"""Type hints: every public function of every humelib module, and every public method (and __init__) of their public
classes, annotates all its parameters and its return."""
import importlib
import inspect
import os
import types

import pytest

MODULES = sorted(os.path.splitext(f)[0] for f in os.listdir(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "humelib")) if f.endswith(".py") and f != "__init__.py")


def public_functions(module):
    """{name: (function, whether its first parameter is self or cls)} of the module's own public functions and of
    its public classes' own public methods and __init__."""
    found = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            found[name] = (obj, False)
        elif inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_") and attr != "__init__":
                    continue
                func = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
                if inspect.isfunction(func):
                    found[f"{name}.{attr}"] = (func, not isinstance(member, staticmethod))
    return found


def missing_hints(functions):
    """'name: what is missing' for each function lacking a parameter's (self and cls aside) or the return's
    annotation."""
    missing = []
    for name, (func, bound) in functions.items():
        sig = inspect.signature(func)  # follows __wrapped__ (torch.no_grad() decorates with functools.wraps)
        params = list(sig.parameters.values())[1 if bound else 0:]
        lacking = [p.name for p in params if p.annotation is inspect.Parameter.empty]
        if sig.return_annotation is inspect.Signature.empty:
            lacking.append("return")
        if lacking:
            missing.append(f"{name}: {', '.join(lacking)}")
    return missing


@pytest.mark.parametrize("name", MODULES)
def test_public_functions_are_fully_annotated(name):
    module = importlib.import_module(f"humelib.{name}")
    functions = public_functions(module)
    assert functions, f"humelib.{name}: no public function found"
    missing = missing_hints(functions)
    assert not missing, f"humelib.{name}, hints missing: " + "; ".join(missing)


def test_the_check_finds_what_is_missing():
    module = types.ModuleType("fake")
    exec("class Box:\n"
         "    def __init__(self, x: int):\n        pass\n"
         "    def get(self, i) -> int:\n        return i\n"
         "    @staticmethod\n    def make(ctx) -> None:\n        pass\n"
         "def f(a: int, b=1) -> int:\n    return a\n"
         "def g(a: int):\n    return a\n"
         "def full(a: int) -> int:\n    return a\n"
         "def _private(a):\n    return a\n", vars(module))
    assert sorted(missing_hints(public_functions(module))) == [
        "Box.__init__: return", "Box.get: i", "Box.make: ctx", "f: b", "g: return"]
