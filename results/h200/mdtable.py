"""Markdown tables for the result scripts under results/h200/ (paper/tables.py, acceptance/tables.py), which print
their README's tables from committed cells with the system python (no torch, so not harness.report)."""
from __future__ import annotations


def row(*values) -> str:
    return "| " + " | ".join(map(str, values)) + " |"


def table(head: list[str], rows: list[list]) -> str:
    return "\n".join([row(*head), row(*["---:"] * len(head)), *(row(*r) for r in rows)])


def fmt(x, spec: str = ".1f", missing: str = "-") -> str:
    return missing if x is None else format(x, spec)
