"""A realistic reconciliation month, generated independently of the code under test.

This package never imports ``keel_pdp.reconcile``: it simulates the requests of a
month, writes what each side recorded in its own documented format, and
computes the expected size of every variance category from the simulated
requests with its own (Decimal) arithmetic.
"""
