"""Adapter tensors owned by the model root, for per-layer FSDP2 (training/sharding.py).

FSDP2's `fully_shard(layer)` claims every parameter registered under `layer`. A factor shared by
several decoder layers is registered in each of them, so two per-layer units would claim it: torch
>= 2.13 raises `Parameter ... is shared with a parameter already managed by another FSDP group`, and
earlier versions left part of it untrained. Here every adapter tensor moves to one module registered
on the model root (`FactorStore`), which only the root's unit claims; the adapted layers keep no
parameter of their own and look their tensors up in the store at each access, by the store's key.
They must not cache the tensor object: FSDP2 swaps the registered parameter between its sharded and
its unsharded form around each forward and backward.

Nothing is copied: a shared factor stays one registered tensor, now under the root. A model is moved
only when it is sharded; single-process training keeps the layout of adapters/base.py.
"""

from typing import Any

from torch import nn

from sharelora_cli.adapters.base import AdaptedLayer
from sharelora_cli.adapters.plan import Adapter

STORE_NAME = "sharelora_factors"


class FactorStore(nn.Module):
    """Every distinct adapter tensor of a model, registered as t0, t1, ... (names are internal)."""

    def key_of(self, tensor: nn.Parameter) -> str:
        """The key under which tensor is registered, registering it if new (compared by identity, never by value)."""
        for key, param in self._parameters.items():
            if param is tensor:
                return key
        key = f"t{len(self._parameters)}"
        self.register_parameter(key, tensor)
        return key


class RootOwned:
    """Mixed into an adapted layer's class: its factors and shared tensors are read from the store.

    The store is held as a plain attribute (object.__setattr__), not a submodule, so that a per-layer
    unit does not claim it.
    """

    _factor_store: FactorStore
    _factor_keys: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        keys = self.__dict__.get("_factor_keys")
        if keys is not None and name in keys:
            return getattr(self.__dict__["_factor_store"], keys[name])
        return super().__getattr__(name)  # type: ignore[misc]  # nn.Module's, next in the MRO

    def __setattr__(self, name: str, value: Any) -> None:
        keys = self.__dict__.get("_factor_keys")
        if keys is not None and name in keys:
            # A rebinding (ASLoRA's merges) points this layer at another tensor of the store.
            keys[name] = self._factor_store.key_of(value)
            return
        super().__setattr__(name, value)


_CLASSES: dict[type, type] = {}


def root_owned_class(cls: type) -> type:
    """cls with RootOwned mixed in (one class per adapted layer type, as FSDP2 does for its units)."""
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"RootOwned{cls.__name__}", (RootOwned, cls), {})
    return _CLASSES[cls]


def move_to_root(model: nn.Module, adapter: Adapter) -> FactorStore:
    """Register every adapter tensor on a FactorStore at model.sharelora_factors and point the layers at it."""
    store = FactorStore()
    for tensor in [t for g in adapter.groups.values() for ts in g.tensors.values() for t in ts]:
        store.key_of(tensor)  # the adapter's order, so every process registers the same keys
    for tensor in adapter.shared.values():
        store.key_of(tensor)
    for layer in adapter.layers():
        _point_at_store(layer, store, (*layer.factor_names, *adapter.shared))
    model.add_module(STORE_NAME, store)
    return store


def _point_at_store(layer: AdaptedLayer, store: FactorStore, names: tuple[str, ...]) -> None:
    keys = {}
    for name in names:
        tensor = layer._parameters.pop(name)
        assert isinstance(tensor, nn.Parameter)  # inject_adapter registers every factor as one
        keys[name] = store.key_of(tensor)
    object.__setattr__(layer, "_factor_store", store)
    object.__setattr__(layer, "_factor_keys", keys)
    layer.__class__ = root_owned_class(type(layer))


def follow_store(adapter: Adapter, store: FactorStore, before: dict[str, nn.Parameter]) -> None:
    """Point the adapter's tensor lists at the store's current parameters, after fully_shard replaced them.

    before: the store's parameters by key, taken before sharding.
    """
    key_of = {id(tensor): key for key, tensor in before.items()}
    current = dict(store.named_parameters())
    for group in adapter.groups.values():
        for factor, tensors in group.tensors.items():
            group.tensors[factor] = [current[key_of[id(t)]] for t in tensors]
    adapter.shared = {name: current[key_of[id(t)]] for name, t in adapter.shared.items()}
