"""Level 4: Kafka on files — partitioned, segmented, indexed logs with consumer groups.

The public API (see README.md)::

    from level_4_hard.file_kafka import Producer, Consumer, Admin

    producer = Producer(data_dir="kafka_data")
    meta = producer.send("orders", {"id": 15}, key="customer-7")  # RecordMetadata
    consumer = Consumer("billing", data_dir="kafka_data", auto_offset_reset="earliest")
    consumer.subscribe("orders")
    records = consumer.poll(timeout=1.0)                             # list[Record]
    consumer.commit()
"""

from level_4_hard.file_kafka.admin import Admin
from level_4_hard.file_kafka.consumer import Consumer
from level_4_hard.file_kafka.errors import (
    CorruptLogError,
    FileKafkaError,
    GroupActiveError,
    IllegalStateError,
    InvalidOffsetError,
    InvalidTopicError,
    NoOffsetForPartitionError,
    OffsetOutOfRangeError,
    RecordTooLargeError,
    TopicExistsError,
    UnknownTopicError,
)
from level_4_hard.file_kafka.producer import Producer
from level_4_hard.file_kafka.records import Record, RecordMetadata, TopicPartition
from level_4_hard.file_kafka.topic import TopicConfig

__all__ = [
    "Admin",
    "Consumer",
    "CorruptLogError",
    "FileKafkaError",
    "GroupActiveError",
    "IllegalStateError",
    "InvalidOffsetError",
    "InvalidTopicError",
    "NoOffsetForPartitionError",
    "OffsetOutOfRangeError",
    "Producer",
    "Record",
    "RecordMetadata",
    "RecordTooLargeError",
    "TopicConfig",
    "TopicExistsError",
    "TopicPartition",
    "UnknownTopicError",
]
