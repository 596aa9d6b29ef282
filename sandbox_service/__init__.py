"""Orchestration: the CLI, study specs, Ray Tune studies, storage and tracking."""
