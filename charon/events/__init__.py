"""The event bus between workers and the supervisor: schema, publisher, receiver."""
