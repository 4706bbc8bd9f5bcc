"""Operations: topic definitions, ClickHouse migrations and the local Kafka launcher."""
