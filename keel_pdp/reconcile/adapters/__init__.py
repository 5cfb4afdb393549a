"""Import adapters: one module per provider export format.

Each adapter turns one export file into normalised ``ProviderLine`` items and
rejects a bad file (missing columns, another currency, duplicate rows, the
wrong month) with an ``InputError`` that names the file, row and column.
"""
