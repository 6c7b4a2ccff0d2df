"""Read models built from the event log: the DuckDB projector and the queries the CLI asks it.

    schema      the tables (DDL and Arrow schemas), and `contents` for comparing two read models
    rows        pure functions from fold states and events to rows
    projection  `Projection`: raw stream messages -> one DuckDB transaction per batch (no NATS)
    projector   `run_projector`: the live process (durable consumers + query service)
    consumers   the durable consumers and the in-order rule for DTF_EVENTS
    artifacts   test lists kept in the artifacts object store (`ResultReported.tests_ref`)
    queries     the read model's questions as functions of a cursor, and their JSON wire form
    service     NATS request-reply on dtf.query.<name> in front of the projector's database
    rebuild     `rebuild` a database from the streams, `tables_equal` to compare two
    sample      a small realistic history for tests and demos
"""
