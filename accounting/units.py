"""Money in the books: integer nano-PCU, so sums are exact and a transfer sums to exactly zero.

1 PCU = 1,000,000,000 nPCU; charges keep their fractions to the nano-PCU, far below any amount
a person reads.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

NANO = 10**9


def to_nano(pcu: float | Decimal | int | str) -> int:
    """PCU → integer nano-PCU (rounded half-even at 1e-9 PCU)."""
    return int((Decimal(str(pcu)) * NANO).to_integral_value(rounding=ROUND_HALF_EVEN))


def to_pcu(nano: int) -> Decimal:
    """Integer nano-PCU → Decimal PCU, exactly."""
    return Decimal(nano) / NANO


def fmt_pcu(nano: int) -> str:
    """Readable PCU: '-1,234.57 PCU', with four decimals below 1 PCU ('-0.0012 PCU')."""
    value = to_pcu(nano)
    return f"{value:,.2f} PCU" if abs(value) >= 1 else f"{value:.4f} PCU"
