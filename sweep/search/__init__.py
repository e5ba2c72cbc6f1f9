"""The search: spaces as data, the Optuna/Ray glue, the trial worker, the saved sweep spec."""
