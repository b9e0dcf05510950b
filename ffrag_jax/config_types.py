"""Typed config sections read by every job (as MaxText's ``configs/types.py``): one LoRA section
per adapted model, ``lora.generator`` and ``lora.retriever``, with the same keys in every
config. Reading a section checks it whole: an unknown key (a typo in a config file) is one
line naming it and listing the valid ones, not a setting silently ignored.
"""

from __future__ import annotations

import dataclasses

import jax
from ml_collections import ConfigDict, config_dict

from ffrag_jax.errors import UserError
from ffrag_jax.models import lora

SECTIONS = ("generator", "retriever")


@dataclasses.dataclass(frozen=True)
class LoRASection:
    """One model's adapters. Every client's scale is ``alpha_ratio`` (``alpha = alpha_ratio *
    rank``, as the reference's alpha = 2r), so ranks can differ without changing the step
    size of the adapted output."""

    targets: str  # module names ("q_proj,v_proj") or "all-linear"
    rank: int = 8
    ranks: tuple[int, ...] | None = None  # federated jobs: one rank per client (over `rank`)
    alpha_ratio: float = 2.0
    dropout: float = 0.0
    where: str = dataclasses.field(default="lora", repr=False)  # its config path, for errors

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "where")

    @classmethod
    def read(cls, config: ConfigDict, name: str) -> LoRASection:
        """``config.lora.<name>`` checked: known keys only, positive ranks and ratio, dropout
        in [0, 1)."""
        where = f"lora.{name}"
        if "lora" not in config or name not in config.lora:
            raise UserError(f"the config has no {where} section (keys: {', '.join(cls.keys())})")
        values = dict(config.lora[name])
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise UserError(f"unknown LoRA key {where}.{unknown[0]}; {where} keys: "
                            f"{', '.join(cls.keys())}")
        if values.get("ranks") is not None:
            values["ranks"] = tuple(int(r) for r in values["ranks"])
        section = cls(**values, where=where)
        for r in (section.rank, *(section.ranks or ())):
            if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
                raise UserError(f"{where}: LoRA rank must be a positive integer, got {r!r}")
        if section.alpha_ratio <= 0:
            raise UserError(f"{where}.alpha_ratio must be positive, got {section.alpha_ratio}")
        if not 0 <= section.dropout < 1:
            raise UserError(f"{where}.dropout must be in [0, 1), got {section.dropout}")
        return section

    def client_ranks(self, num_clients: int) -> list[int]:
        """One rank per client: ``ranks`` (which must have ``num_clients`` entries) or
        ``rank`` for all."""
        if self.ranks is None:
            return [self.rank] * num_clients
        if len(self.ranks) != num_clients:
            raise UserError(f"{self.where}.ranks has {len(self.ranks)} entries but "
                            f"fl.num_clients={num_clients}")
        return list(self.ranks)

    def init(self, rng: jax.Array, params: dict, rank: int | None = None) -> lora.LoRA:
        """A fresh adapter on ``params`` at ``rank`` (default: ``rank``)."""
        rank = self.rank if rank is None else rank
        return lora.init(rng, params, self.targets, rank, self.alpha_ratio * rank,
                         dropout=self.dropout)


def lora_section(targets: str, rank: int = 8, *, alpha_ratio: float = 2.0, dropout: float = 0.0,
                 ranks: tuple[int, ...] | None = None) -> ConfigDict:
    """The ``ConfigDict`` form of a :class:`LoRASection`, for config files."""
    return ConfigDict(dict(targets=targets, rank=rank, alpha_ratio=alpha_ratio, dropout=dropout,
                           ranks=config_dict.FieldReference(ranks, field_type=tuple)))
