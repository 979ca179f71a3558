"""file_kafka."""
