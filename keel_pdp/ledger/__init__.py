"""The ledger: the durable, append-only record finance co-signs.

The writer (``writer.py``) consumes the decision stream that the budget
scripts append to and stores every event exactly once (``store.py``); the
period logic, reports and exports read only the store.
"""
