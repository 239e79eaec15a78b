-- Last applied Kafka offset per (projection, topic, partition), written in the same
-- transaction as the rows it covers: a redelivered event at or below it is skipped.
CREATE TABLE IF NOT EXISTS projection_offsets (
    projection VARCHAR(64) NOT NULL,
    topic VARCHAR(249) NOT NULL,
    `partition` INT NOT NULL,
    `offset` BIGINT NOT NULL,
    updated_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3),
    PRIMARY KEY (projection, topic, `partition`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
