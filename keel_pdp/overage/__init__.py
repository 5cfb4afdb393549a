"""The exception workflow: a workload owner asks to exceed the budget that denied
one of their requests, an approver of the budget's exception path approves (a
time-boxed grant the hold script applies) or refuses, and every step is an event
on the ledger linked to the denial.

Named ``overage`` (the amount a budget is allowed to go over), not
``exceptions``, so it cannot be confused with Python's exceptions.
"""

from keel_pdp.overage.workflow import (
    ExceptionAsk,
    ExceptionConflict,
    ExceptionDesk,
    ExceptionView,
    NotADenial,
    UnknownException,
)

__all__ = ["ExceptionAsk", "ExceptionConflict", "ExceptionDesk", "ExceptionView", "NotADenial",
           "UnknownException"]
