-- Termination, restore and purge (organisation lifecycle).
ALTER TABLE tenants
    ADD COLUMN IF NOT EXISTS archive_database VARCHAR(64) NULL COMMENT 'where the tables wait while archived',
    ADD COLUMN IF NOT EXISTS terminated_by_event CHAR(36) NULL COMMENT 'event_id of the OrganisationTerminated of the current archive',
    ADD COLUMN IF NOT EXISTS termination_reason TEXT NULL,
    ADD COLUMN IF NOT EXISTS restored_at DATETIME(3) NULL,
    ADD COLUMN IF NOT EXISTS purged_at DATETIME(3) NULL;

-- Lifecycle events already applied, so the purge of an archive can tell "not reached yet"
-- (wait: a replay is catching up) from "superseded by a restore" (skip).
CREATE TABLE IF NOT EXISTS lifecycle_log (
    event_id CHAR(36) NOT NULL PRIMARY KEY,
    organisation_id CHAR(36) NOT NULL,
    kind VARCHAR(32) NOT NULL,
    outcome VARCHAR(32) NOT NULL,
    occurred_at DATETIME(3) NOT NULL,
    KEY ix_lifecycle_log_organisation (organisation_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
