"""The machinery every mode shares, below the modes (lte.single, lte.distributed) and the front
door (lte.train): the run config (config: the schema and each section's rules; loader: YAML and
overrides into it), the run's model (model), the engine that trains one process's model (engine),
the round clock (clock), the run directory (rundir) and the results it holds (results), logging
(log), the end of a run (finish), task losses and metrics (tasks) and local-chunk rounds (chunks)."""
