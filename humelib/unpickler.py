"""The one unpickler every pickle the project reads goes through (results_{seed}.pickle, CIFAR-100's label file): it
builds builtins containers and scalars and numpy arrays, dtypes and scalars, nothing else, so a hostile file cannot
run code. fileio.load_results reads results pickles through it.
"""
import pickle
from typing import IO, Any

_RESULTS_GLOBALS = {  # what pickles of dicts of builtins, numpy arrays, dtypes and scalars need, nothing more
    ("builtins", n) for n in ("set", "frozenset", "complex", "bytearray", "slice")} | {
    ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype")} | {
    (f"numpy.{core}.{mod}", n) for core in ("core", "_core")
    for mod, n in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}


class _ResultsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _RESULTS_GLOBALS:
            raise pickle.UnpicklingError(f"refuses to load object {module}.{name}")
        return super().find_class(module, name)


def restricted_load(f: IO[bytes], encoding: str = "ASCII") -> Any:
    """Unpickle from an open binary file, building only builtins containers and scalars and numpy arrays, dtypes
    and scalars; anything else raises pickle.UnpicklingError("refuses to load object MODULE.NAME")."""
    return _ResultsUnpickler(f, encoding=encoding).load()
