"""What model tokens cost: a per-model price table users can extend.

Prices are per million tokens, with a currency. A table is read from a JSON
or TOML file (``COMMANDER_PRICES`` or ``--prices``)::

    # prices.toml
    [models."doubao-1-5-ui-tars*"]     # fnmatch pattern, case-insensitive
    input = 3.5
    output = 12.0
    currency = "CNY"

or JSON ``{"models": {"gpt-4o": {"input": 2.5, "output": 10, "currency": "USD"}}}``.
An exact name wins over a pattern; among patterns the longest wins. A model
with no entry costs 0 with no currency — reported as unknown, never guessed.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from commander._errors import CommanderError


@dataclasses.dataclass(frozen=True)
class ModelPrice:
    """Price per million input and output tokens."""

    input: float
    output: float
    currency: str

    def cost(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input + output_tokens * self.output) / 1_000_000


#: Built in: local models are free. Hosted prices change; users supply them.
BUILTIN_PRICES: Mapping[str, ModelPrice] = {
    "smollm2*": ModelPrice(0.0, 0.0, "USD"),
    "scripted*": ModelPrice(0.0, 0.0, "USD"),
}


class PriceTable:
    """Model name (or fnmatch pattern) → :class:`ModelPrice`."""

    def __init__(self, prices: Mapping[str, ModelPrice] | None = None) -> None:
        self._prices: dict[str, ModelPrice] = {
            k.lower(): v for k, v in (BUILTIN_PRICES if prices is None else prices).items()
        }

    def extend(self, prices: Mapping[str, ModelPrice]) -> PriceTable:
        """A new table with ``prices`` added over these."""
        merged = dict(self._prices)
        merged.update({k.lower(): v for k, v in prices.items()})
        return PriceTable(merged)

    def lookup(self, model: str) -> ModelPrice | None:
        name = model.lower()
        if name in self._prices:
            return self._prices[name]
        matches = [p for p in self._prices if fnmatch.fnmatchcase(name, p)]
        return self._prices[max(matches, key=len)] if matches else None

    def cost(self, model: str, input_tokens: int, output_tokens: int) -> tuple[float, str]:
        """(cost, currency); (0.0, "") for a model with no price."""
        price = self.lookup(model)
        if price is None:
            return 0.0, ""
        return price.cost(input_tokens, output_tokens), price.currency

    @classmethod
    def load(cls, path: str | Path | None = None) -> PriceTable:
        """The built-in table extended by ``path`` (or ``$COMMANDER_PRICES``) when given."""
        table = cls()
        source = path or os.environ.get("COMMANDER_PRICES")
        if not source:
            return table
        return table.extend(parse_prices(Path(source)))


def parse_prices(path: Path) -> dict[str, ModelPrice]:
    """Entries of a JSON or TOML price file; :class:`CommanderError` when malformed."""
    try:
        raw = path.read_bytes()
        data: Any = (
            json.loads(raw) if path.suffix.lower() == ".json" else tomllib.loads(raw.decode())
        )
    except (OSError, ValueError) as exc:
        raise CommanderError(f"cannot read the price table {path}: {exc}") from exc
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise CommanderError(f"price table {path}: expected a 'models' table")
    prices: dict[str, ModelPrice] = {}
    for name, entry in models.items():
        try:
            price = ModelPrice(
                input=float(entry["input"]),
                output=float(entry["output"]),
                currency=str(entry.get("currency", "USD")),
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise CommanderError(
                f"price table {path}: model {name!r} needs numeric 'input' and 'output'"
            ) from exc
        if not (math.isfinite(price.input) and math.isfinite(price.output)):
            # inf or nan would make every cost of the model inf or nan, which the
            # dispatcher refuses (and a max_cost could not be enforced).
            raise CommanderError(f"price table {path}: model {name!r} has a non-finite price")
        if price.input < 0 or price.output < 0:
            raise CommanderError(f"price table {path}: model {name!r} has a negative price")
        prices[str(name)] = price
    return prices
