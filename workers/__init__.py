"""The worker agent: registers its hardware, heartbeats, takes its own assignments and runs them."""
