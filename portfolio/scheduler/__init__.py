"""Schedules, the job queue and the worker: the continual-learning loop."""
