"""What a method module (``rpc/*_methods.py``) needs of the RPC server: a place to register.

Each module of extra ``/rpc`` methods has one ``register_*(registry, ...)`` function taking
what its methods call (the split service, the deployer, the node) and adding them with
``registry.register(name, ParamsModel, fn)``: ``fn`` gets the validated params model. The
server imports the method modules; they never import the server (no circle).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from pydantic import BaseModel

Handler = Callable[[Any], Awaitable[Any]]


class Registry(Protocol):
    def register(self, name: str, params: type[BaseModel], fn: Handler) -> None: ...
