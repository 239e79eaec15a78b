-- The latest change applied to each custom host (assigned or removed, and by which retailer),
-- by the time it happened: a change older than it, arriving at any offset (a dead-letter
-- replay, a producer retry), changes nothing. A removal stays here as its tombstone. A purge
-- removes its retailer's rows, so its hosts are free again.
CREATE TABLE IF NOT EXISTS domain_changes (
    host VARCHAR(253) NOT NULL PRIMARY KEY,
    changed_at BIGINT NOT NULL COMMENT 'epoch ms, as tenancy::clock places the event',
    event_id CHAR(36) NOT NULL,
    retailer_id CHAR(36) NOT NULL,
    assigned BOOLEAN NOT NULL,
    KEY ix_domain_changes_retailer (retailer_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
