"""Training-free step caching of many-step recipes (``step_cache`` config group)."""
