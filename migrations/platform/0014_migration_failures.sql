-- Rolling migrations of tenant databases (`tenancy migrate`, and the rollout every worker runs
-- in the background): `migration_version` (0001) is the version a tenant's database is at;
-- these say why its last migration failed and when. A failed tenant's events wait; the rollout
-- passes it by until `tenancy migrate --retry`. Portable and safe to run again (see 0004).
SET @rollout = (SELECT IF(COUNT(*) = 0,
    'ALTER TABLE tenants ADD COLUMN migration_failure TEXT NULL COMMENT ''why its last migration failed; NULL once one succeeds'', ADD COLUMN migration_failed_at DATETIME(3) NULL',
    'DO 0')
    FROM information_schema.COLUMNS
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tenants' AND COLUMN_NAME = 'migration_failure');
PREPARE rollout FROM @rollout;
EXECUTE rollout;
DEALLOCATE PREPARE rollout;
