-- Rebuilds in progress (`tenancy rebuild`), for `tenancy status`: one row per tenant being
-- rebuilt, rewritten every few seconds and removed when the rebuild ends. The claim itself is a
-- MySQL named lock, so a row whose lock nobody holds is a rebuild that was killed.
CREATE TABLE IF NOT EXISTS rebuilds (
    organisation_id CHAR(36) NOT NULL PRIMARY KEY,
    host VARCHAR(255) NOT NULL,
    pid INT NOT NULL,
    phase VARCHAR(32) NOT NULL,
    events_read BIGINT NOT NULL DEFAULT 0,
    events_applied BIGINT NOT NULL DEFAULT 0,
    started_at DATETIME(3) NOT NULL,
    heartbeat_at DATETIME(3) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
