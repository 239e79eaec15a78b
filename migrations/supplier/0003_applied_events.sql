-- Ids of the events each projection applied here, written in the same transaction as the rows:
-- an event that comes back at a new offset (a producer retry, a re-run of emit, a dead-letter
-- replay) is skipped by its id. Kept 35 days after it was applied (pruned as new ones arrive).
CREATE TABLE IF NOT EXISTS applied_events (
    event_id CHAR(36) NOT NULL,
    projection VARCHAR(64) NOT NULL,
    topic VARCHAR(249) NOT NULL,
    `partition` INT NOT NULL,
    `offset` BIGINT NOT NULL,
    applied_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
    PRIMARY KEY (projection, event_id),
    KEY ix_applied_events_applied_at (applied_at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
