"""Read models built from the event log: the DuckDB projector and the queries the CLI asks it."""
