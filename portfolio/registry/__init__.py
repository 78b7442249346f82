"""The versioned adapter registry: schema, queries and the `Registry` API."""
