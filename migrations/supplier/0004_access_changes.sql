-- The latest grant or revoke applied for each brand, by the time it happened: an older one,
-- arriving at any offset (a dead-letter replay, a producer retry), changes nothing. A revoke
-- stays here as its tombstone, also when it was applied while either side was archived, so a
-- restore brings back no access it took away.
CREATE TABLE IF NOT EXISTS access_changes (
    brand_id CHAR(36) NOT NULL PRIMARY KEY,
    changed_at BIGINT NOT NULL COMMENT 'epoch ms, as tenancy::clock places the event',
    event_id CHAR(36) NOT NULL,
    granted BOOLEAN NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
