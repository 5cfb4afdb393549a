"""Monthly reconciliation of provider invoices against internal usage telemetry.

The provider export (what was billed) and the internal usage export (what the
gateway recorded) are rolled up to one grain (UTC day x provider project or
workspace x model x token type), joined, and every difference is put in a named
category. The result is the four-document set finance signs: the provider
export as imported, the internal usage export for the same window, the
chargeback ledger and the variance memo.
"""
