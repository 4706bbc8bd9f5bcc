"""A local single-node Apache Kafka (KRaft) for development and tests; see `launcher`."""
