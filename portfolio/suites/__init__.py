"""Behavioural suites: cases and checks, running them on versions, release metrics."""
