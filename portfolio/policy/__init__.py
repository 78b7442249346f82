"""Policies as plain data and pure rules, below the registry: gate criteria and their checks
(`gates`), the bounded retention sample (`retention`). No database, no model, no torch."""
