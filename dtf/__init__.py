"""dtf, the domain: events, task specs, the task/worker state machines, the scheduling policy and
the CLI that wires the processes together."""

__version__ = "0.1.0"
