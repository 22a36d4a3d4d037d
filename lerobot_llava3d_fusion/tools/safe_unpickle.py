"""A restricted unpickler for what LeRobot's async-inference protocol sends over the network.

LeRobot's ``policy_server`` runs ``pickle.loads`` on every message a client sends: whoever reaches the
port can make the server call any importable function (``os.system``, ...). :func:`safe_loads` only
rebuilds what the protocol needs: LeRobot's message types (``TimedObservation``, ``TimedAction``,
``RemotePolicyConfig``, ``PolicyFeature``), numpy arrays and scalars, torch tensors, and plain Python
values. Anything else is refused before it is called, with :class:`UnsafePickleError` naming it.

Torch tensors pickle their storage as a ``torch.save`` archive read back by
``torch.storage._load_from_bytes``, which calls ``torch.load(weights_only=False)``, a second full
unpickler; here that archive is read with ``torch.load(weights_only=True)`` instead.
"""

from __future__ import annotations

import io
import pickle  # nosec: the Unpickler below only resolves the allow-listed globals
from typing import Any

import torch


class UnsafePickleError(pickle.UnpicklingError):
    """A client message referenced a global outside the allow-list."""


def _load_storage_from_bytes(data: bytes) -> Any:
    """``torch.storage._load_from_bytes`` without its unrestricted ``torch.load``."""
    return torch.load(io.BytesIO(data), weights_only=True)


# module -> names the protocol's messages may reference. numpy moved `core` to `_core` in 2.0; a client
# on numpy 1.x pickles the old module names.
_NUMPY_ARRAYS = {"_reconstruct", "scalar"}
ALLOWED_GLOBALS: dict[str, set[str]] = {
    "lerobot.async_inference.helpers": {"TimedObservation", "TimedAction", "TimedData", "RemotePolicyConfig"},
    "lerobot.configs.types": {"PolicyFeature", "FeatureType", "NormalizationMode"},
    "numpy": {"ndarray", "dtype"},
    "numpy._core.multiarray": _NUMPY_ARRAYS,
    "numpy.core.multiarray": _NUMPY_ARRAYS,
    "numpy._core.numeric": {"_frombuffer"},
    "numpy.core.numeric": {"_frombuffer"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_parameter"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "complex", "bytearray", "slice"},
}
_REPLACED_GLOBALS = {("torch.storage", "_load_from_bytes"): _load_storage_from_bytes}


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only :data:`ALLOWED_GLOBALS` (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _REPLACED_GLOBALS:
            return _REPLACED_GLOBALS[(module, name)]
        if name in ALLOWED_GLOBALS.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(
            f"refused to unpickle {module}.{name}: the policy server only accepts LeRobot's async-inference "
            "messages (observations, policy instructions) made of tensors, arrays and plain values."
        )


def safe_loads(data: bytes) -> Any:
    """``pickle.loads`` restricted to the async-inference protocol's types (see the module docstring)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()
