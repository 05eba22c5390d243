"""The unified evaluation runner, results store and tables (built on the task packages)."""
