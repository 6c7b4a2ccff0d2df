"""The JetStream topology and the wire contract: streams, consumers and object stores declared in one
place (`topology`), the embedded nats-server (`server`), connecting and publishing events (`bus`),
and the JSON Schemas of every event (`schemas/`, written by `dtf schema`)."""
