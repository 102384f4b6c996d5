"""A tiny name -> function registry, and the four algorithm registries."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable)


class Registry(Generic[F]):
    """Maps names to functions. Register with ``@REG.register("name")``; look up with ``REG.get("name")``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._fns: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._fns:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._fns[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        try:
            return self._fns[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}; valid names: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._fns)

    def __contains__(self, name: object) -> bool:
        return name in self._fns

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# fn(scores [B], group_ids [B], *, response_mask [B, T] | None = None, **options) -> [B] or [B, T]
ADVANTAGE_ESTIMATORS: Registry = Registry("advantage estimator")
# fn(logprobs, old_logprobs, advantages, response_mask, **options) -> (loss scalar, metrics dict)
POLICY_LOSSES: Registry = Registry("policy loss")
# fn(logprobs [B, T], ref_logprobs [B, T]) -> [B, T]
KL_ESTIMATORS: Registry = Registry("KL estimator")
# fn(loss_mat [B, T], mask [B, T]) -> scalar
LOSS_AGGREGATIONS: Registry = Registry("loss aggregation")
