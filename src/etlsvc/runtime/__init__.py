"""Runtime: runs (claim, execute, finish), the scheduler and service, metrics."""
