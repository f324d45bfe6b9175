"""What a cluster costs per hour now and what a planned scale would cost."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Estimate:
    """PCU per hour of a cluster's workers now and of a planned scale.

    ``current_pcu_per_hour`` is what the lab is charged per hour for the workers it holds
    (workers on its own machines are free); ``current_list_pcu_per_hour`` ignores that.
    ``planned_*`` are filled when an estimate was asked for a number of workers; they are list
    prices, so the bill is lower for the part that lands on the lab's own machines.
    """

    current_pcu_per_hour: float
    current_list_pcu_per_hour: float
    planned_workers: int | None = None
    planned_pcu_per_hour: float | None = None
    planned_pcu_per_hour_per_worker: float | None = None
    planned_cloud_cost_per_hour: float | None = None
    currency: str = "USD"

    @classmethod
    def from_answers(cls, cost: dict, quote: dict | None) -> Estimate:
        return cls(current_pcu_per_hour=float(cost["pcu_per_hour"]),
                   current_list_pcu_per_hour=float(cost["list_pcu_per_hour"]),
                   planned_workers=quote["workers"] if quote else None,
                   planned_pcu_per_hour=quote["pcu_per_hour"] if quote else None,
                   planned_pcu_per_hour_per_worker=(quote["pcu_per_hour_per_worker"]
                                                    if quote else None),
                   planned_cloud_cost_per_hour=quote["cloud_cost_per_hour"] if quote else None,
                   currency=cost.get("currency", "USD"))

    def __str__(self) -> str:
        text = f"now: {self.current_pcu_per_hour:.4g} PCU/h"
        if self.current_list_pcu_per_hour != self.current_pcu_per_hour:
            text += f" ({self.current_list_pcu_per_hour:.4g} PCU/h before own-lab machines)"
        if self.planned_workers is not None:
            text += (f"; {self.planned_workers} workers: {self.planned_pcu_per_hour:.4g} PCU/h "
                     f"({self.planned_pcu_per_hour_per_worker:.4g} each; about "
                     f"{self.planned_cloud_cost_per_hour:,.2f} {self.currency}/h in a cloud)")
        return text
